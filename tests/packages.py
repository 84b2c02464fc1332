"""The RPMs built from this tree, and their files unpacked into a directory, for the tests.

Built once per session by ``scripts/build-rpms`` (what ``make rpm`` runs) into a tmp topdir.
Tests that need rpmbuild, rpm2cpio or cpio skip with the reason when one is missing (``make
system-deps`` installs them where apt-get can; ``make test`` fails such a skip).

The wheels a package's install-venv installs for real in the tests are downloaded once into
``.cache/wheelhouse`` (ignored by git) and reused while they satisfy its requirements.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import ROOT

PROGRAMS = ("cortex", "neuron")
WHEELHOUSE = ROOT / ".cache/wheelhouse"


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


def wheelhouse(requirements: Path) -> Path:
    """A directory holding wheels for everything ``requirements`` needs: what it already holds
    when that is enough (pip asked offline), else downloaded there from the indexes once."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    download = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                "-d", str(WHEELHOUSE), "-r", str(requirements)]  # fmt: skip
    offline = [*download, "--no-index", "--find-links", str(WHEELHOUSE)]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    if subprocess.run(offline, env=env, capture_output=True).returncode != 0:
        done = subprocess.run(download, capture_output=True, text=True)
        assert done.returncode == 0, f"pip download failed:\n{done.stderr}"
    return WHEELHOUSE


def install_venv(
    unpacked: Path, program: str, venv: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """The unpacked package's install-venv run for real into ``venv`` with this Python, pip's
    own configuration left out (only what ``env`` says counts)."""
    return subprocess.run(
        [str(unpacked / f"usr/libexec/helexa-{program}/install-venv")],
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(venv.parent),
            "PYTHON": sys.executable,
            "HELEXA_VENV": str(venv),
            "HELEXA_REQUIREMENTS": str(unpacked / f"usr/share/helexa-{program}/requirements.txt"),
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=600,
    )


@contextmanager
def counting_index() -> Iterator[tuple[str, list[str]]]:
    """A package index on a loopback port that has nothing and notes every path asked of it:
    (its URL, the paths asked so far)."""
    asked: list[str] = []

    class Nothing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_error(404)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Nothing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/simple", asked
    finally:
        server.shutdown()
        server.server_close()
