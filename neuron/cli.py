"""The ``neuron`` command: ``neuron serve --config PATH`` and ``neuron info``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from helexa.configfile import ConfigError
from helexa.logsetup import configure
from neuron import __version__
from neuron.auth import Access
from neuron.config import DEFAULT_PATH, NeuronConfig, load

log = logging.getLogger("neuron")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neuron", description="helexa worker daemon")
    parser.add_argument("--version", action="version", version=f"neuron {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve models over gRPC")
    serve.add_argument("--config", type=Path, default=DEFAULT_PATH)
    info = commands.add_parser("info", help="print this host's devices and their memory")
    info.add_argument("--config", type=Path, default=None, help="use this config's device settings")
    check = commands.add_parser("check-config", help="read a config file and report errors")
    check.add_argument("--config", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)

    try:
        config = load(args.config) if args.config is not None else NeuronConfig()
        # The token and TLS files are read here, so check-config finds a bad one too.
        access = Access.load(config) if args.command != "info" else Access()
    except ConfigError as e:
        print(f"neuron: bad config: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{args.config}: ok ({len(config.default_models)} default models)")
        return 0
    if args.command == "info":
        return _info(config)
    configure(config.log_level)
    log.info("neuron starting version=%s config=%s", __version__, args.config)
    return asyncio.run(_serve(config, access))


async def _serve(config: NeuronConfig, access: Access) -> int:
    # Download and weight-loading progress bars are for terminals, not the daemon's log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    from neuron.lifecycle import serve

    transformers_logging.disable_progress_bar()

    return await serve(config, access)


def _info(config: NeuronConfig) -> int:
    from neuron.devices import cuda_free_bytes, discover

    print(f"{'DEVICE':<8} {'TOTAL':>10} {'FREE':>10}  DESCRIPTION")
    for device in discover(config.devices):
        free = cuda_free_bytes(device.index) if device.kind == "cuda" else device.total_bytes
        print(
            f"{device.name:<8} {_gib(device.total_bytes):>10} {_gib(free):>10}  "
            f"{device.description}"
        )
    return 0


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f}GiB"


if __name__ == "__main__":
    raise SystemExit(main())
