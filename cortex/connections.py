"""Client connections, with the bounds aiohttp's server lacks against slow or greedy clients.

Each connection's protocol is aiohttp's own request handler, wrapped: a request's headers must
all arrive within ``timeouts.header`` of its first byte (of the connection's opening, for the
first), else the connection is closed; one client address holds at most
``limits.max_connections_per_address`` connections, past which a new one is answered 429 and
closed. (The body has its own bound, ``timeouts.body``, where the handler reads it.) The
middleware says when a request's headers are in (``started``) and when it is answered
(``finished``), by the request's transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from cortex import metrics

log = logging.getLogger(__name__)

_REFUSAL = (
    b'{"error": {"message": "too many connections from this address '
    b'(limits.max_connections_per_address)", "type": "requests", "param": null, "code": null}}'
)
_TOO_MANY = (
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSAL), _REFUSAL)
)


class Connections:
    """The open connections, by transport and by client address. One sweep a second closes
    those whose request's headers are late (a timer per request would cost every request)."""

    def __init__(self, header_timeout: float, per_address: int) -> None:
        self.header_timeout = header_timeout
        self.per_address = per_address
        self.by_transport: dict[Any, _Guarded] = {}
        self.by_address: Counter[str] = Counter()
        self._sweeper: asyncio.TimerHandle | None = None

    def sweep(self) -> None:
        """Close the connections whose request's headers took over ``header_timeout``."""
        loop = asyncio.get_running_loop()
        late = loop.time() - self.header_timeout
        for guard in list(self.by_transport.values()):
            if guard.waiting_since is not None and guard.waiting_since < late:
                guard.too_slow()
        self._sweeper = loop.call_later(min(1.0, self.header_timeout / 4), self.sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def protocol(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server``: ``inner``'s protocols, guarded."""
        return lambda: _Guarded(self, inner())

    def started(self, transport: Any) -> None:
        guard = self.by_transport.get(transport)
        if guard is not None:
            guard.in_request = True
            guard.waiting_since = None

    def finished(self, transport: Any) -> None:
        guard = self.by_transport.get(transport)
        if guard is not None:
            guard.in_request = False


class _Guarded(asyncio.Protocol):
    def __init__(self, connections: Connections, inner: Any) -> None:
        self._connections = connections
        self._inner = inner
        self._transport: Any = None
        self._address = ""
        self.in_request = False
        # When the bytes of a request whose headers are not all in began (None: none such).
        self.waiting_since: float | None = None

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        connections = self._connections
        connections.by_address[self._address] += 1
        if connections.by_address[self._address] > connections.per_address:
            metrics.REJECTIONS.labels(reason="connections_per_address").inc()
            transport.write(_TOO_MANY)
            transport.close()
            self._inner = None
            return
        connections.by_transport[transport] = self
        self.waiting_since = asyncio.get_running_loop().time()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self.in_request and self.waiting_since is None:
            # The first bytes of the next request on this connection.
            self.waiting_since = asyncio.get_running_loop().time()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        connections = self._connections
        connections.by_transport.pop(self._transport, None)
        connections.by_address[self._address] -= 1
        if connections.by_address[self._address] <= 0:
            del connections.by_address[self._address]
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def too_slow(self) -> None:
        self.waiting_since = None
        metrics.REJECTIONS.labels(reason="header_timeout").inc()
        log.info(
            "closing a connection whose request headers took over timeouts.header address=%s",
            self._address,
        )
        self._transport.close()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections ``connections`` guards."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, connections: Connections, **kw: Any
    ) -> None:
        super().__init__(runner, **kw)
        self._host, self._port, self._connections = host, port, connections

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._connections.sweep()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._connections.protocol(server), self._host, self._port, reuse_address=True
        )

    async def stop(self) -> None:
        self._connections.stop()
        await super().stop()
