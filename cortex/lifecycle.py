"""cortex's life: start the fleet and the HTTP server; drain on SIGTERM or SIGINT.

On the first signal ``/ready`` turns 503 and new API requests get 503 with ``Retry-After``;
requests in flight (streams included) may finish within ``shutdown.drain_timeout``; then the
server stops, the neuron channels close and cortex exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

from aiohttp import web

from cortex import metrics
from cortex.api import Gateway, build_app
from cortex.auth import AdminKeys, KeyRing, listen_host
from cortex.config import Catalogue, CortexConfig
from cortex.connections import Connections, GuardedSite
from cortex.fleet import Fleet
from cortex.neuronlink import Link
from cortex.router import Router
from helexa.sdnotify import notify
from helexa.signals import dump_stacks_on_sigusr1, stop_event_on_signals

log = logging.getLogger(__name__)

# Seconds cut streams have to write their error event once the drain's bound has passed.
CUT_GRACE = 2.0


async def serve(
    config: CortexConfig,
    catalogue: Catalogue,
    keyring: KeyRing,
    links: dict[str, Link],
    admin_keys: AdminKeys | None = None,
    config_path: Path | None = None,
) -> int:
    """Run cortex until a signal; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = stop_event_on_signals(loop)
    dump_stacks_on_sigusr1()
    admins = admin_keys or AdminKeys(config.admin)

    def reload_keys() -> None:
        keyring.reload_soon()
        admins.reload_soon()

    # `systemctl reload cortex`: re-read the keys files; connections and streams carry on.
    loop.add_signal_handler(signal.SIGHUP, reload_keys)

    host, port = listen_host(config), config.listen.rpartition(":")[2]
    try:
        metrics.serve(config.metrics_listen)
    except OSError as e:
        log.error("cannot listen metrics_listen=%s error=%s", config.metrics_listen, e)
        return 1
    fleet = Fleet(config, links)
    router = Router(config, fleet, catalogue)
    gateway = Gateway(config, catalogue, fleet, router, config_path=config_path)
    # handler_cancellation: a client that goes away cancels its handler, and so its gRPC call.
    connections = Connections(config.timeouts.header, config.limits.max_connections_per_address)
    runner = web.AppRunner(
        build_app(gateway, keyring, connections, admins),
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=config.timeouts.idle,
    )
    await runner.setup()
    try:
        await fleet.start()
        site = GuardedSite(runner, host, int(port), connections, shutdown_timeout=1.0)
        try:
            await site.start()
        except OSError as e:
            log.error("cannot listen listen=%s error=%s", config.listen, e)
            return 1
        log.info(
            "cortex serving listen=%s:%s metrics=%s neurons=%d up=%d models=%d api_keys=%s "
            "admin_keys=%s",
            host, port, config.metrics_listen, len(fleet.neurons),
            sum(n.routable for n in fleet.neurons), len(catalogue.models),
            keyring.count if keyring.enabled else "none",
            admins.count if admins.config.enabled else "none",
        )  # fmt: skip
        notify("READY=1")  # after the log line: READY means the journal already says so
        await stop.wait()
        await _drain(gateway, config)
        return 0
    finally:
        await runner.cleanup()
        await router.close()
        await fleet.close()
        log.info("cortex stopped")


async def _drain(gateway: Gateway, config: CortexConfig) -> None:
    started = time.monotonic()
    gateway.draining = True
    notify("STOPPING=1")
    log.info(
        "draining in_flight=%d drain_timeout=%.1f", gateway.active, config.shutdown.drain_timeout
    )
    if not await gateway.wait_idle(config.shutdown.drain_timeout):
        log.warning("drain timeout passed, cutting in_flight=%d", gateway.active)
        # Each cut stream ends with an error event (and [DONE]), not a bare close.
        gateway.cut()
        await gateway.wait_idle(CUT_GRACE)
    log.info("drained seconds=%.2f", time.monotonic() - started)
