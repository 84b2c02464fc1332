"""cortex's HTTP surface: the aiohttp application, its error middleware and the probes.

Handlers per API surface live beside this module (``openai``, ``responses``, ``anthropic``);
they parse, and ``relay`` calls the router and writes. ``admin`` is the operators' API. Every failure of any handler becomes its
surface's error envelope (Anthropic's on ``/v1/messages``, else OpenAI's) in the middleware,
through ``cortex.api.errors``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from cortex import metrics
from cortex.api.errors import (
    anthropic_error_response,
    anthropic_http_error_response,
    anthropic_internal_error_response,
    error_response,
    http_error_response,
    internal_error_response,
    is_anthropic,
)
from cortex.auth import ADMIN_KEYS, KEYRING, AdminKeys, KeyRing, require_key
from cortex.config import Catalogue, CortexConfig
from cortex.connections import Connections
from cortex.errors import CortexError, NoCapacity, ShuttingDown
from cortex.fleet import Fleet
from cortex.resume import Resumable
from cortex.router import Router

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Gateway:
    """What the handlers share: config, fleet, router, and the drain's bookkeeping."""

    config: CortexConfig
    catalogue: Catalogue
    fleet: Fleet
    router: Router
    draining: bool = False
    active: int = 0
    # The cortex.toml it was started from: where the admin's catalogue reload finds models.toml.
    config_path: Path | None = None
    # Unix seconds when this gateway (and its catalogue) came up: the models' ``created``.
    started: int = field(default_factory=lambda: int(time.time()))
    # The streams being relayed now, for the drain to cut past its bound (``cut``).
    streams: set[Resumable] = field(default_factory=set)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    def cut(self) -> None:
        """End every stream being relayed with an error event (the drain's bound passed)."""
        for stream in list(self.streams):
            stream.cut(
                ShuttingDown("cortex is shutting down: the answer was cut at its drain's bound")
            )

    async def wait_idle(self, within: float) -> bool:
        """Wait until no API request is running; False if ``within`` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), within)
        except TimeoutError:
            return False
        return True


GATEWAY = web.AppKey("gateway", Gateway)
CONNECTIONS = web.AppKey("connections", Connections)


def gateway_of(request: web.Request) -> Gateway:
    return request.app[GATEWAY]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Envelope every failure; refuse new API work while draining; count every answer."""
    gateway = gateway_of(request)
    connections = request.app[CONNECTIONS]
    connections.started(request.transport)  # its headers are in
    try:
        return await _answer(request, handler, gateway)
    finally:
        connections.finished(request.transport)


async def _answer(request: web.Request, handler: Handler, gateway: Gateway) -> web.StreamResponse:
    api = request.path.startswith("/v1/")
    anthropic = is_anthropic(request.path)
    started = time.monotonic()
    status = "500"
    retry_after = gateway.config.timeouts.retry_after
    try:
        if api:
            if gateway.draining:
                metrics.REJECTIONS.labels(reason="shutting_down").inc()
                raise ShuttingDown("cortex is shutting down; retry on another instance")
            if gateway.active >= gateway.config.limits.max_concurrent:
                metrics.REJECTIONS.labels(reason="max_concurrent").inc()
                raise NoCapacity(
                    f"cortex is serving {gateway.active} requests, its limit "
                    "(limits.max_concurrent); retry later"
                )
            gateway.active += 1
            gateway._idle.clear()
            try:
                response = await handler(request)
            finally:
                gateway.active -= 1
                if gateway.active == 0:
                    gateway._idle.set()
        else:
            response = await handler(request)
        status = str(response.status)
        return response
    except CortexError as e:
        refused = (anthropic_error_response if anthropic else error_response)(e, retry_after)
        status = str(refused.status)
        log.info("request refused path=%s status=%s error=%s", request.path, status, e.message)
        return refused
    except web.HTTPException as e:
        status = str(e.status)
        return (anthropic_http_error_response if anthropic else http_error_response)(e)
    except asyncio.CancelledError:
        status = "499"  # the client went away (nginx's name for it)
        raise
    except Exception:
        log.exception("unexpected error path=%s", request.path)
        return anthropic_internal_error_response() if anthropic else internal_error_response()
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        model = request.get("model_label", "-")
        metrics.REQUESTS.labels(route=name, model=model, status=status).inc()
        if api:
            metrics.REQUEST_DURATION.labels(route=name, model=model).observe(
                time.monotonic() - started
            )


async def health(request: web.Request) -> web.Response:
    """The process lives."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready when not draining and at least one neuron is up."""
    gateway = gateway_of(request)
    up = [n.name for n in gateway.fleet.neurons if n.routable]
    if gateway.draining:
        return web.json_response({"status": "draining", "neurons_up": up}, status=503)
    if not up:
        return web.json_response({"status": "no neuron up", "neurons_up": up}, status=503)
    return web.json_response({"status": "ready", "neurons_up": up})


def build_app(
    gateway: Gateway,
    keyring: KeyRing,
    connections: Connections | None = None,
    admin_keys: AdminKeys | None = None,
) -> web.Application:
    from cortex.api import admin, anthropic, openai, openapi, responses

    app = web.Application(
        middlewares=[_errors, require_key], client_max_size=gateway.config.limits.max_body
    )
    app[GATEWAY] = gateway
    app[KEYRING] = keyring
    app[ADMIN_KEYS] = admin_keys or AdminKeys(gateway.config.admin)
    app[CONNECTIONS] = connections or Connections(gateway.config.timeouts.header, 1 << 30)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/openapi.json", openapi.openapi)
    openai.add_routes(app)
    responses.add_routes(app)
    anthropic.add_routes(app)
    admin.add_routes(app)
    return app
