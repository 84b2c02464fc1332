"""The RPMs built from this tree, and their files unpacked into a directory, for the tests.

Built once per session by ``scripts/build-rpms`` (what ``make rpm`` runs) into a tmp topdir.
Tests that need rpmbuild, rpm2cpio or cpio skip with the reason when one is missing (``make
system-deps`` installs them where apt-get can).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import ROOT

PROGRAMS = ("cortex", "neuron")


@dataclass(frozen=True)
class Package:
    """One built RPM: ``helexa-<program>``."""

    program: str
    path: Path

    @property
    def name(self) -> str:
        return f"helexa-{self.program}"

    def query(self, *args: str) -> str:
        """``rpm -qp ARGS PATH``'s output."""
        return subprocess.run(
            ["rpm", "-qp", *args, str(self.path)], check=True, capture_output=True, text=True
        ).stdout

    def files(self) -> list[str]:
        return self.query("-l").split()

    def file_flags(self) -> dict[str, tuple[str, str, str]]:
        """path -> (file flags such as ``cn``, mode, ``user:group``)."""
        fmt = "[%{FILENAMES}\t%{FILEFLAGS:fflags}\t%{FILEMODES:perms}\t%{FILEUSERNAME}:%{FILEGROUPNAME}\n]"
        rows = [line.split("\t") for line in self.query("--qf", fmt).splitlines()]
        return {row[0]: (row[1], row[2], row[3]) for row in rows}


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make system-deps installs them)")


def build(topdir: Path) -> dict[str, Package]:
    require_tools("rpmbuild", "rpm", "git")
    done = subprocess.run(
        [str(ROOT / "scripts/build-rpms"), str(topdir)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},  # it writes the man pages with it
    )
    assert done.returncode == 0, f"build-rpms failed:\n{done.stdout}\n{done.stderr}"
    packages = {}
    for program in PROGRAMS:
        (path,) = (topdir / "RPMS/noarch").glob(f"helexa-{program}-*.noarch.rpm")
        packages[program] = Package(program, path)
    return packages


def unpack(package: Package, into: Path) -> Path:
    """The package's files under ``into`` (rpm2cpio | cpio), as they would lie under /."""
    require_tools("rpm2cpio", "cpio")
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        f"rpm2cpio '{package.path}' | cpio -idm --quiet",
        shell=True,
        check=True,
        cwd=into,
    )
    return into
