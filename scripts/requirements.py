"""Print the pip requirements of one deployable, read from pyproject.toml.

``cortex``: the base dependencies (never torch); ``neuron``: the base plus the ``neuron`` extra.
The RPM specs run this at build time, so the packaged requirements.txt that install-venv reads
cannot drift from pyproject.toml.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(program: str, pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    base = list(project["dependencies"])
    if program == "cortex":
        return base
    if program == "neuron":
        return base + list(project["optional-dependencies"]["neuron"])
    raise SystemExit(f"requirements.py: expected cortex or neuron, got {program!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: requirements.py cortex|neuron", file=sys.stderr)
        return 2
    print("\n".join(requirements(argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
