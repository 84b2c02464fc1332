"""The ``cortex`` command: ``serve``, ``status`` and ``check-config``, and the admin commands
(``drain``, ``undrain``, ``load``, ``unload``, ``pin``, ``unpin``: ``cortex.adminclient``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from cortex import __version__, adminclient
from cortex.auth import AdminKeys, KeyRing
from cortex.config import DEFAULT_PATH, Catalogue, CortexConfig, load, models_path
from cortex.neuronlink import Link, read_links
from helexa.configfile import ConfigError
from helexa.logsetup import configure

log = logging.getLogger("cortex")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cortex", description="helexa gateway daemon")
    parser.add_argument("--version", action="version", version=f"cortex {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "serve the OpenAI-compatible API over the configured neurons"),
        ("check-config", "read cortex.toml and its models.toml and report the first error"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", type=Path, default=DEFAULT_PATH)
    _add_status(commands)
    adminclient.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command in adminclient.COMMANDS:
        return adminclient.run(args)
    if args.command == "status" and not args.direct:
        try:
            return _status_of_cortex(args)
        except KeyboardInterrupt:  # how --watch ends
            return 0

    try:
        config, catalogue = load(args.config)
        links = read_links(config)
        # `status` calls no API: it needs the neurons' token and TLS files, not the API keys.
        keyring = KeyRing(config.auth)
        admin_keys = AdminKeys(config.admin)
        if args.command != "status":  # --direct
            keyring.load()
            admin_keys.load()
    except ConfigError as e:
        print(f"cortex: bad config: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(
            f"{args.config}: ok ({len(config.neurons)} neurons); "
            f"{models_path(config, args.config)}: ok ({len(catalogue.models)} models)"
        )
        return 0
    if args.command == "status":
        try:
            return asyncio.run(_status(config, catalogue, links, args))
        except KeyboardInterrupt:  # how --watch ends
            return 0
    configure(config.log_level)
    log.info("cortex starting version=%s config=%s", __version__, args.config)
    # uvloop: the gateway's loop runs for every relayed message, and costs less per turn.
    return uvloop.run(_serve(config, catalogue, keyring, links, admin_keys, args.config))


async def _serve(
    config: CortexConfig,
    catalogue: Catalogue,
    keyring: KeyRing,
    links: dict[str, Link],
    admin_keys: AdminKeys,
    config_path: Path,
) -> int:
    from cortex.lifecycle import serve

    return await serve(config, catalogue, keyring, links, admin_keys, config_path)


def _add_status(commands: Any) -> None:
    sub = commands.add_parser(
        "status",
        help="print the fleet as the running cortex sees it (its admin API), or with --direct "
        "as a poll of every configured neuron shows it",
    )
    adminclient.add_target_options(sub, timeout=30.0)
    sub.add_argument(
        "--direct",
        action="store_true",
        help="poll the neurons of --config once from here instead of asking cortex (works "
        "while cortex is down; no drains or requests in flight, which only cortex knows)",
    )
    sub.add_argument("--json", action="store_true", help="print the fleet as JSON")
    sub.add_argument(
        "--watch",
        action="store_true",
        help="ask again and redraw every --interval seconds until interrupted "
        "(with --json: one JSON document per line)",
    )
    sub.add_argument(
        "--interval",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="seconds between polls with --watch (default 2)",
    )


def _show(body: dict[str, Any], args: argparse.Namespace) -> None:
    from cortex.fleetstatus import as_table

    if args.json:
        print(json.dumps(body), flush=True)
    else:
        # Redrawn in place: the cursor home, the screen cleared.
        clear = "\x1b[H\x1b[2J" if args.watch else ""
        print(clear + as_table(body), flush=True)


def _status_of_cortex(args: argparse.Namespace) -> int:
    """``cortex status``: the admin API's fleet view; 0 while a neuron is up, else 1."""
    try:
        url, key = adminclient.target(args)
    except ConfigError as e:
        print(f"cortex: {e} (`cortex status --direct` polls the neurons itself)", file=sys.stderr)
        return 2
    while True:
        body = adminclient.call("status", "GET", url, "/admin/v1/fleet", key, args.timeout)
        if body is not None:
            _show(body, args)
        if not args.watch:
            return 0 if body is not None and body["up"] else 1
        time.sleep(args.interval)


async def _status(
    config: CortexConfig, catalogue: Catalogue, links: dict[str, Link], args: argparse.Namespace
) -> int:
    """``cortex status --direct``: the neurons polled from here."""
    from cortex.fleet import Fleet
    from cortex.fleetstatus import as_json, up_count

    fleet = Fleet(config, links)
    try:
        while True:
            await fleet.poll_all()
            _show(as_json(fleet, catalogue), args)
            if not args.watch:
                return 0 if up_count(fleet) else 1
            await asyncio.sleep(args.interval)
    finally:
        await fleet.close()


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a number of seconds above 0")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
