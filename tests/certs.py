"""Certificates for TLS tests, made with the ``openssl`` command: CAs and the leaves they sign."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.packages import require_tools

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> Pair:
    require_tools("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req", "-x509", *_KEY, "-keyout", pair.key, "-out", pair.cert, "-days", "2",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def issue(ca: Pair, name: str, san: str = "DNS:localhost,IP:127.0.0.1") -> Pair:
    """A leaf for ``name`` signed by ``ca``, good for a server (at ``san``) and for a client."""
    directory = ca.cert.parent
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    csr, extensions = directory / f"{name}.csr", directory / f"{name}.ext"
    extensions.write_text(
        f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
    )
    _openssl("req", "-new", *_KEY, "-keyout", pair.key, "-out", csr, "-subj", f"/CN={name}")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
        "-out", pair.cert, "-days", "2", "-extfile", extensions,
    )  # fmt: skip
    return pair
