"""``cortex status|drain|undrain|load|unload|pin|unpin``: the admin API of a running cortex, from
a shell.

The cortex is ``--url``, else ``$HELEXA_CORTEX_URL``, else the ``listen`` address of ``--config``
(``0.0.0.0`` read as 127.0.0.1). The admin key is ``$HELEXA_ADMIN_KEY``, else the first key of
``--config``'s ``[admin]`` (inline, then its keys_file); it is sent, never printed. Each command
prints one line saying what was done and exits 0, or prints the API's error and exits 1 (2 for
a config it cannot read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from cortex.config import DEFAULT_PATH, load_config, parse_admin_key
from helexa.configfile import ConfigError
from helexa.secretfiles import read_lines

URL_ENV = "HELEXA_CORTEX_URL"
KEY_ENV = "HELEXA_ADMIN_KEY"
COMMANDS = {
    "drain": "stop routing new requests to a neuron; its streams finish, its process stays up",
    "undrain": "route requests to a drained neuron again",
    "load": "load a catalogue model on a neuron (409 when it does not fit)",
    "unload": "unload a model from a neuron",
    "pin": "keep a model loaded on a neuron from eviction",
    "unpin": "let a pinned model be evicted again",
}


def add_commands(commands: Any) -> None:
    """The admin subcommands, on ``cortex``'s subparsers."""
    for name, text in COMMANDS.items():
        sub = commands.add_parser(name, help=text)
        if name in ("drain", "undrain"):
            sub.add_argument("neuron")
        else:
            sub.add_argument("model", help="a catalogue model id or alias")
            sub.add_argument("--neuron", required=True)
        add_target_options(sub, timeout=900.0)


def add_target_options(sub: argparse.ArgumentParser, timeout: float) -> None:
    """--config, --url and --timeout: which cortex a command asks, with which key."""
    sub.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_PATH,
        help=f"cortex.toml: its listen address, and its first [admin] key unless ${KEY_ENV} is set",
    )
    sub.add_argument("--url", help=f"cortex's address (else ${URL_ENV}, else --config)")
    sub.add_argument("--timeout", type=float, default=timeout, help="seconds to wait")


def run(args: argparse.Namespace) -> int:
    try:
        url, key = target(args)
    except ConfigError as e:
        print(f"cortex: {e}", file=sys.stderr)
        return 2
    neuron = urllib.parse.quote(args.neuron, safe="")
    if args.command in ("drain", "undrain"):
        path = f"/admin/v1/neurons/{neuron}/{args.command}"
    else:
        model = urllib.parse.quote(args.model, safe="")
        path = f"/admin/v1/neurons/{neuron}/models/{model}/{args.command}"
    body = call(args.command, "POST", url, path, key, args.timeout)
    if body is None:
        return 1
    print(describe(args.command, body))
    return 0


def call(
    command: str, method: str, url: str, path: str, key: str, timeout: float
) -> dict[str, Any] | None:
    """One admin API call: its JSON answer, or None when it failed, the reason printed to
    stderr (``cortex COMMAND: 404 neuron_not_found: ...``, ``... cannot reach URL: ...``)."""
    try:
        status, body = _request(method, url.rstrip("/") + path, key, timeout)
    except OSError as e:  # refused, unreachable, timed out
        why = e.reason if isinstance(e, urllib.error.URLError) else e
        print(f"cortex {command}: cannot reach {url}: {why}", file=sys.stderr)
        return None
    if status != 200 or not isinstance(body, dict):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") or f"HTTP {status}"
        code = error.get("code") or "error"
        print(f"cortex {command}: {status} {code}: {message}", file=sys.stderr)
        return None
    return body


def target(args: argparse.Namespace) -> tuple[str, str]:
    """The cortex to ask and the admin key to ask with (see the module's docstring)."""
    url = args.url or os.environ.get(URL_ENV, "")
    key = os.environ.get(KEY_ENV, "")
    if url and key:
        return url, key
    config = load_config(args.config)
    if not url:
        host, _, port = config.listen.rpartition(":")
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]", "") else host
        url = f"http://{host}:{port}"
    if not key:
        lines = list(config.admin.keys)
        if config.admin.keys_file:
            lines += read_lines(config.admin.keys_file, "admin.keys_file")
        if not lines:
            raise ConfigError(f"no admin key: set ${KEY_ENV} or [admin] keys in {args.config}")
        key = parse_admin_key(lines[0], "admin.keys[0]")[1]
    return url, key


def _request(method: str, url: str, key: str, timeout: float) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=b"" if method == "POST" else None,
        method=method,
        headers={"Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return int(reply.status), json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read() or b"{}")
        except ValueError:
            body = {}
        return int(e.code), body


def describe(command: str, body: dict[str, Any]) -> str:
    """One line saying what the admin API did."""
    if command in ("drain", "undrain"):
        name, in_flight = body["name"], body["in_flight"]
        if command == "drain":
            return (
                f"neuron {name} drained: no new requests go to it; "
                f"{in_flight} in flight finish there"
            )
        return f"neuron {name} undrained: it takes new requests (status {body['status']})"
    neuron, model = body["neuron"], body["model"]
    if command == "load":
        if body["already_loaded"]:
            return f"model {model['id']} was already loaded on neuron {neuron}"
        return (
            f"model {model['id']} loaded on neuron {neuron}: {model.get('state', '?')} on "
            f"{model.get('device', '?')}, {model.get('resident_bytes', 0)} bytes"
        )
    if command == "unload":
        if not body["was_loaded"]:
            return f"model {model} was not loaded on neuron {neuron}"
        return f"model {model} unloaded from neuron {neuron}: {body['freed_bytes']} bytes freed"
    return f"model {model} {'pinned' if body['pinned'] else 'unpinned'} on neuron {neuron}"
