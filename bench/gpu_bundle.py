"""What the GPU check carries to a host that has no network (``make gpu-wheels``).

That host's own python already holds torch with CUDA, transformers, grpcio, protobuf,
aiohttp, prometheus-client and pytest, at its own versions. The bundle holds wheels of what it
may lack (or hold too old: our generated gRPC code needs protobuf and grpcio at least as new
as the ones it was generated with), the requirements the check installs from them with
``pip install --no-index`` (pip keeps every package the host already satisfies), and the demo
model's tokenizer, which the check's random-weight models use.

    .venv/bin/python -m bench.gpu_bundle [--dest .gpu] [--python-version 3.12]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.harness import ROOT
from tests.random_models import extract_tokenizer

# Wheels of the versions this tree is tested with, for the packages the host may lack.
CARRIED = (
    "grpcio",
    "grpcio-health-checking",
    "protobuf",
    "tomli-w",
    "gguf",
    "pytest",
    "pytest-asyncio",
    "pytest-timeout",
)
# Imported only for constrained decoding, which the check does not run; its wheel and its
# own needs would take a large share of what may travel.
LEFT_OUT = ("xgrammar",)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def requirements() -> list[str]:
    """What the check needs importable: the runtime needs of cortex and neuron and the test
    runner's, as pyproject.toml states them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev = [r for r in project["optional-dependencies"]["dev"] if _name(r).startswith("pytest")]
    wanted = project["dependencies"] + project["optional-dependencies"]["neuron"] + dev
    return [r for r in wanted if _name(r) not in LEFT_OUT]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def download(dest: Path, python_version: str) -> list[Path]:
    """The carried wheels, at the versions installed here, for ``python_version`` on x86-64."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--implementation", "cp", "--python-version", python_version, *platforms,
         "-d", str(dest), *pins],
        check=True,
    )  # fmt: skip
    return sorted(dest.glob("*.whl"))


def make(dest: Path, python_version: str) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    wheels = download(dest / "wheels", python_version)
    (dest / "requirements.txt").write_text("\n".join(requirements()) + "\n")
    extract_tokenizer(dest / "tokenizer")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {len(wheels)} wheels and the tokenizer, {size / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--python-version", default="3.12", help="the GPU host's python")
    args = parser.parse_args()
    make(args.dest, args.python_version)


if __name__ == "__main__":
    main()
