"""Secrets kept in files of their own (API keys, the neuron token, TLS keys), shared by both daemons.

Keeping them out of the main config lets the config stay readable to more people than the
secrets. A file that is missing, unreadable or empty is a ``ConfigError`` naming the config key
that points at it; the message never carries the file's contents.
"""

from __future__ import annotations

from helexa.configfile import ConfigError


def read_bytes(path: str, key: str) -> bytes:
    """The whole file (a certificate or a private key in PEM)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    if not data.strip():
        raise ConfigError(f"{key}: {path} is empty")
    return data


def read_lines(path: str, key: str) -> list[str]:
    """One secret per line; blank lines and lines starting with ``#`` are skipped."""
    text = read_bytes(path, key).decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def check_secret(value: str, key: str) -> None:
    """A key or token: not empty, no whitespace (it travels in an HTTP or gRPC header)."""
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"{key}: must be non-empty with no whitespace")


def check_token(token: str, token_file: str, key: str) -> None:
    """A token given inline or in a file, not both (``key`` is the section, e.g. ``auth``)."""
    if token:
        check_secret(token, f"{key}.token")
    if token and token_file:
        raise ConfigError(f"{key}.token: give token or token_file, not both")


def read_token(token: str, token_file: str, key: str) -> str:
    """The token given inline or in a file of one line; ``""`` when neither is set."""
    if not token_file:
        return token
    lines = read_lines(token_file, f"{key}.token_file")
    if len(lines) != 1:
        raise ConfigError(f"{key}.token_file: {token_file} must hold exactly one token line")
    check_secret(lines[0], f"{key}.token_file")
    return lines[0]
