"""The neuron's life: activation, serving, and deactivation on SIGTERM or SIGINT.

Activation loads the default models one after another before the gRPC port binds, so the
first request already sees them READY. Deactivation turns health NOT_SERVING, refuses new
work, lets in-flight generation drain within ``shutdown.drain_timeout`` (then cancels what is
left, finish reason ``cancelled``), unloads every model and stops the server. A second signal
exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from helexa.sdnotify import notify
from helexa.signals import dump_stacks_on_sigusr1, stop_event_on_signals
from neuron import metrics
from neuron.auth import Access
from neuron.config import NeuronConfig
from neuron.errors import NeuronError
from neuron.registry import Registry
from neuron.server import NeuronService

log = logging.getLogger(__name__)

SERVICE_NAME = "helexa.neuron.v1.Neuron"
# cortex pings every 20 s at the most; allow that (and more) without GOAWAY too_many_pings.
SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.so_reuseport", 0),
]


async def serve(config: NeuronConfig, access: Access) -> int:
    """Run the neuron until a signal; returns the exit code."""
    stop = stop_event_on_signals(asyncio.get_running_loop())
    dump_stacks_on_sigusr1()

    metrics.serve(config.metrics_listen)
    registry = Registry(config)
    try:
        await _activate(registry, config, stop)
        if stop.is_set():
            log.info("stopped during activation")
            return 0
        service = NeuronService(registry)
        health_service = health.aio.HealthServicer()
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=access.interceptors)
        pb_grpc.add_NeuronServicer_to_server(service, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
        try:
            if access.credentials is not None:
                server.add_secure_port(config.listen, access.credentials)
            else:
                server.add_insecure_port(config.listen)
        except RuntimeError as e:
            log.error("cannot listen listen=%s error=%s", config.listen, e)
            return 1
        await server.start()
        if access.open_beyond_loopback(config.listen):
            log.warning(
                "no token and no mTLS, and auth.allow_unauthenticated = true: anyone who reaches "
                "listen=%s may load models and run them",
                config.listen,
            )
        for name in ("", SERVICE_NAME):
            await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "neuron serving listen=%s metrics=%s models=%d %s",
            config.listen, config.metrics_listen, len(registry.models), access.describe(),
        )  # fmt: skip
        notify("READY=1")  # after the log line: READY means the journal already says so
        await stop.wait()
        await _deactivate(registry, config, service, health_service, server)
        return 0
    finally:
        await registry.unload_all()
        registry.close()


async def _activate(registry: Registry, config: NeuronConfig, stop: asyncio.Event) -> None:
    for spec in config.default_models:
        if stop.is_set():
            return
        started = time.monotonic()
        try:
            await registry.load(spec)
        except NeuronError as e:
            log.warning(
                "default model failed to load model=%s seconds=%.2f error=%s",
                spec.id, time.monotonic() - started, e,
            )  # fmt: skip
            continue
        log.info("default model ready model=%s seconds=%.2f", spec.id, time.monotonic() - started)


async def _deactivate(
    registry: Registry,
    config: NeuronConfig,
    service: NeuronService,
    health_service: health.aio.HealthServicer,
    server: grpc.aio.Server,
) -> None:
    started = time.monotonic()
    # First, so that callers polling health stop sending before anything is refused.
    await health_service.enter_graceful_shutdown()
    service.begin_drain()
    metrics.DRAINING.set(1)
    notify("STOPPING=1")
    log.info(
        "draining in_flight=%d drain_timeout=%.1f",
        service.active_generations, config.shutdown.drain_timeout,
    )  # fmt: skip
    if not await service.wait_drained(config.shutdown.drain_timeout):
        log.warning("drain timeout passed, cancelling in_flight=%d", service.active_generations)
        registry.abort_all()
        await service.wait_drained(10.0)
    log.info("drained seconds=%.2f", time.monotonic() - started)
    await registry.unload_all()
    await server.stop(grace=1.0)
    log.info("neuron stopped seconds=%.2f", time.monotonic() - started)
