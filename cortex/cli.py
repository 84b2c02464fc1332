"""The ``cortex`` command: ``serve``, ``status`` and ``check-config``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import uvloop

from cortex import __version__
from cortex.auth import KeyRing
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
        ("status", "poll every configured neuron once and print the fleet as a table"),
        ("check-config", "read cortex.toml and its models.toml and report the first error"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)

    try:
        config, catalogue = load(args.config)
        links = read_links(config)
        # `status` calls no API: it needs the neurons' token and TLS files, not the API keys.
        keyring = KeyRing(config.auth)
        if args.command != "status":
            keyring.load()
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
        return asyncio.run(_status(config, catalogue, links))
    configure(config.log_level)
    log.info("cortex starting version=%s config=%s", __version__, args.config)
    # uvloop: the gateway's loop runs for every relayed message, and costs less per turn.
    return uvloop.run(_serve(config, catalogue, keyring, links))


async def _serve(
    config: CortexConfig, catalogue: Catalogue, keyring: KeyRing, links: dict[str, Link]
) -> int:
    from cortex.lifecycle import serve

    return await serve(config, catalogue, keyring, links)


async def _status(config: CortexConfig, catalogue: Catalogue, links: dict[str, Link]) -> int:
    from cortex.fleet import UP, Fleet

    fleet = Fleet(config, links)
    try:
        await fleet.poll_all()
    finally:
        await fleet.close()
    print(f"{'NEURON':<16} {'STATUS':<9} {'ENDPOINT':<22} DEVICES / MODELS")
    for n in fleet.neurons:
        devices = ", ".join(
            f"{d.name} {_gib(d.free_bytes)} free of {_gib(d.total_bytes)}" for d in n.devices
        )
        detail = devices or (n.error or "-")
        print(f"{n.name:<16} {n.status:<9} {n.endpoint:<22} {detail}")
        for m in sorted(n.models.values(), key=lambda m: m.id):
            pinned = " pinned" if (e := catalogue.find(m.id)) is not None and e.pinned else ""
            print(
                f"{'':<16}   {m.id:<28} {m.state:<9} {m.device:<7} {_gib(m.resident_bytes):>9} "
                f"in_flight={m.in_flight} waiting={m.waiting}{pinned}"
            )
    up = sum(n.status == UP for n in fleet.neurons)
    print(f"{up} of {len(fleet.neurons)} neurons up")
    return 0 if up else 1


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f}GiB"


if __name__ == "__main__":
    raise SystemExit(main())
