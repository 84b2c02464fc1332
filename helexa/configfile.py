"""Strict TOML → dataclass loading shared by cortex and neuron.

Unknown keys and wrong types are errors naming the full key (``engine.max_batch_size``), so a
typo in an operator's config stops the daemon at start instead of running on defaults.
Fields whose metadata says ``unit="bytes"`` accept an integer or a size like ``"8GiB"``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10, "ki": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20, "mi": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "gi": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40, "ti": 1 << 40,
}  # fmt: skip


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ShutdownConfig:
    """``[shutdown]`` of both daemons: how long in-flight work may run after SIGTERM/SIGINT
    before what is left is cancelled and the process exits."""

    drain_timeout: float = 30.0

    def check_config(self, key: str) -> None:
        if self.drain_timeout < 0:
            raise ConfigError(f"{key}.drain_timeout: must not be negative")


def parse_bytes(value: Any, key: str) -> int:
    """An integer number of bytes, or a size string such as ``"512MiB"`` or ``"8GB"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size in bytes, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            number, unit = match.groups()
            return int(float(number) * _UNITS[(unit or "").lower()])
    raise ConfigError(f"{key}: expected a size such as 8GiB or 512MiB, got {value!r}")


def check_address(value: str, key: str) -> None:
    """A ``HOST:PORT`` listen or endpoint address."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")


def is_loopback(listen: str) -> bool:
    """Whether a ``HOST:PORT`` listen address takes connections from this host only."""
    host = listen.rpartition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_log_level(value: str, key: str = "log_level") -> None:
    if value.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{key}: expected debug, info, warning or error")


def load_file(cls: type[T], path: Path) -> T:
    """Build ``cls`` from the TOML file at ``path``; every error starts with the path."""
    try:
        return build(cls, load_toml(path))
    except ConfigError as e:
        message = str(e)
        raise ConfigError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def build(cls: type[T], data: Any, key: str = "") -> T:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in data:
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_join(key, name)}: unknown key (known keys: {known})")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in data:
            continue
        full = _join(key, name)
        if field.metadata.get("unit") == "bytes":
            values[name] = None if data[name] is None else parse_bytes(data[name], full)
        else:
            values[name] = _convert(hints[name], data[name], full)
    try:
        obj = cls(**values)
    except TypeError as e:  # a required key is missing
        missing = [n for n, f in fields.items() if n not in values and _required(f)]
        if missing:
            raise ConfigError(f"{_join(key, missing[0])}: required key is missing") from None
        raise ConfigError(f"{key or 'config'}: {e}") from None
    check = getattr(obj, "check_config", None)
    if check is not None:
        check(key)
    return obj


def _required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _join(key: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{key}[{name}]"
    return f"{key}.{name}" if key else name


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for option in options:
            try:
                return _convert(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(item, v, _join(key, i)) for i, v in enumerate(value)]
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: must be one of {', '.join(map(repr, allowed))}, got {value!r}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)  # type: ignore[arg-type]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # a programming error, named anyway
