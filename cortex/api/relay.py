"""One generation relayed to an HTTP client, for every API surface: the body read once, the
router's stream opened while keep-alives go out, and the answer written whole or as SSE.

A surface says only how its answers look (a ``Dialect``); the waiting is written once here.
The opening (placement, retries, the first message) runs on its own task while keep-alive
comments go out; then the relay takes the messages straight from the generation's buffer:
each SSE write carries everything that arrived while the previous write was in flight (the
first token goes out at once), the surface's keep-alives (SSE comments, or Anthropic's
``ping`` events) are sent while no token comes, and a stream with no token for
``timeouts.stall`` ends with the surface's error event. A generation whose neuron fails
mid-way goes on on another neuron (``cortex.resume``), the client none the wiser. When the
client disconnects, aiohttp cancels the handler (``handler_cancellation``), which closes the
stream and so cancels the generation on the neuron, which stops generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiohttp import web

from cortex import metrics
from cortex.api import GATEWAY, Gateway
from cortex.errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    CortexError,
    StreamStalled,
)
from cortex.resume import Resumable
from cortex.router import Stream
from helexa.neuron.v1 import neuron_pb2 as pb

log = logging.getLogger(__name__)

FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
# An SSE comment: the OpenAI surfaces' keep-alive.
KEEPALIVE = b": keep-alive\n\n"
T = TypeVar("T")


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; ``BodyTooLarge`` over ``[limits] max_body``."""
    limit = request.client_max_size
    if (request.content_length or 0) > limit:
        raise _too_large(limit)
    within = request.app[GATEWAY].config.timeouts.body
    try:
        if request.content.is_eof():  # all of it came with the headers: nothing to wait for
            raw = await request.read()
        else:
            async with asyncio.timeout(within):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except TimeoutError:
        raise BodyTimeout(
            f"The request body did not arrive within timeouts.body ({within:g} s)"
        ) from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"The request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("The request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    return body


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"The request body is larger than the limit of {limit} bytes")


def checked(parse: Callable[..., T], *args: Any) -> T:
    """``parse(*args)``, with a string protobuf cannot hold a 400 rather than a 500."""
    try:
        return parse(*args)
    except UnicodeEncodeError:  # JSON may escape a lone surrogate; protobuf strings cannot hold it
        raise BadRequest(
            "The request holds a string that is not valid Unicode (a lone surrogate such as "
            "\\ud800)"
        ) from None


def constraint(request: pb.GenerateRequest) -> str | None:
    """What the neuron holds the output to: ``json_object``, ``json_schema``, ``tools``."""
    output = request.output.WhichOneof("kind")
    if output is not None:
        return output
    if request.tools and request.tool_choice.mode != pb.TOOL_CHOICE_MODE_NONE:
        return "tools"
    return None


@dataclass
class Outcome:
    """What a generation came to: its finish and usage, and for a whole answer everything."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    stop_sequence: str = ""  # the stop string that ended it, if one did
    tool_calls: list[pb.ToolCallDelta] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)


def absorb(outcome: Outcome, message: pb.GenerateResponse) -> str:
    """Fold one message's finish and usage into ``outcome``; returns its text. (A neuron's
    cancel, its drain past its bound, never reaches here: ``Resumable.take`` raises it.)"""
    if message.finish_reason:
        outcome.finish_reason = FINISH.get(message.finish_reason, "stop")
        outcome.prompt_tokens = message.usage.prompt_tokens
        outcome.completion_tokens = message.usage.completion_tokens
        outcome.cached_tokens = message.usage.cached_prompt_tokens
        outcome.stop_sequence = message.stop_sequence
    return message.text


class Dialect(Protocol):
    """How one surface's answers look, whole and streamed."""

    id: str  # the answer's id, also the neuron's request_id
    model: str
    generate: pb.GenerateRequest
    stream: bool
    keepalive: bytes  # sent while no token comes (``KEEPALIVE``, or the surface's own event)

    def param(self, field: str) -> str:
        """The client's name of a request field the neuron named (``tools[2].parameters``)."""
        ...

    def whole(self, outcome: Outcome) -> dict[str, Any]:
        """The whole answer's JSON body."""
        ...

    def opening(self) -> bytes:
        """What a stream opens with, before its first keep-alive or token (b"": the first
        ``delta`` opens it, and keep-alives may come before that)."""
        ...

    def delta(self, text: str, messages: list[pb.GenerateResponse], first: bool) -> bytes:
        """What one write carries of ``messages`` (whose text, joined, is ``text``)."""
        ...

    def ending(self, outcome: Outcome) -> bytes:
        """What a stream ends with once the generation finished (``outcome``)."""
        ...

    def failure(self, error: CortexError) -> bytes:
        """What a stream ends with when ``error`` cut it after it began."""
        ...


async def relay(request: web.Request, gateway: Gateway, dialect: Dialect) -> web.StreamResponse:
    """Open the generation ``dialect.generate`` asks for and answer with it, whole or as SSE."""
    request["model_label"] = dialect.model
    dialect.generate.request_id = dialect.id
    kind = constraint(dialect.generate)
    if kind is not None:
        metrics.CONSTRAINED.labels(kind=kind).inc()
    arrived = time.monotonic()
    opening = gateway.router.open(dialect.model, dialect.generate, dialect.param)
    if not dialect.stream:
        return await _whole(gateway, dialect, opening)
    return await _stream(request, gateway, dialect, asyncio.create_task(opening), arrived)


async def _whole(
    gateway: Gateway, dialect: Dialect, opening: Coroutine[Any, Any, Stream]
) -> web.Response:
    """The answer as one JSON body. Its tokens come held together (``message_interval``), so
    there is no first-token time."""
    timeouts = gateway.config.timeouts
    # Before the first message a placement may run (bounded by timeouts.load).
    within = timeouts.load + timeouts.stall
    try:
        async with asyncio.timeout(within):  # cancels the opening, and so the generation
            stream = await opening
    except TimeoutError:
        raise StreamStalled(f"no token from the neuron within {within:g} seconds") from None
    loop = asyncio.get_running_loop()
    outcome = Outcome()
    parts: list[str] = []
    resumable = Resumable(gateway.router, dialect.model, dialect.generate, stream, dialect.param)
    try:
        while True:
            try:
                messages = resumable.take()
            except CortexError as e:
                if not resumable.resumable():
                    raise
                try:
                    async with asyncio.timeout(within):
                        await resumable.resume()
                except TimeoutError:
                    raise StreamStalled(
                        f"no token from the neuron within {within:g} seconds"
                    ) from None
                except CortexError:
                    raise e from None
                continue
            for message in messages:
                parts.append(absorb(outcome, message))
                outcome.tool_calls.extend(message.tool_calls)
                outcome.logprobs.extend(message.logprobs)
            if outcome.finish_reason:
                outcome.text = "".join(parts)
                return web.json_response(dialect.whole(outcome))
            if not await resumable.wait(loop.time() + timeouts.stall):
                raise StreamStalled(f"no token from the neuron within {timeouts.stall:g} seconds")
    finally:
        resumable.close()


async def _stream(
    request: web.Request,
    gateway: Gateway,
    dialect: Dialect,
    opening: asyncio.Task[Stream],
    arrived: float,
) -> web.StreamResponse:
    """The answer as SSE. Each write carries every message that came while the last one was
    in flight; the response opens with the first message, or with the first keep-alive."""
    timeouts = gateway.config.timeouts
    loop = asyncio.get_running_loop()
    sse = _Events(request, dialect)
    stalled = StreamStalled(f"no token from the neuron for {timeouts.stall:g} seconds")
    outcome = Outcome()
    stream: Resumable | None = None
    resuming: asyncio.Task[None] | None = None
    try:
        # Until the first message a placement may run (bounded by timeouts.load).
        if not await sse.keep_alive(opening, timeouts.load + timeouts.stall):
            return await sse.fail(stalled)
        try:
            stream = Resumable(
                gateway.router, dialect.model, dialect.generate, opening.result(), dialect.param
            )
        except CortexError as e:
            return await sse.fail(e)
        gateway.streams.add(stream)
        metrics.TIME_TO_FIRST_TOKEN.labels(model=dialect.model).observe(time.monotonic() - arrived)
        first = True
        last_token = last_write = loop.time()
        while True:
            try:
                messages = stream.take()
            except CortexError as e:
                if not stream.resumable():
                    return await sse.fail(e)
                # Another neuron goes on from the text so far; a placement may run first.
                resuming = asyncio.create_task(stream.resume())
                if not await sse.keep_alive(resuming, timeouts.load + timeouts.stall):
                    return await sse.fail(stalled)
                if resuming.exception() is not None:
                    return await sse.fail(e)  # no neuron could take it: as if never tried
                last_token = last_write = loop.time()
                continue
            if messages:
                text = "".join([absorb(outcome, message) for message in messages])
                last_token = loop.time()
                out = sse.head() + dialect.delta(text, messages, first)
                first = False
                if outcome.finish_reason:
                    out += dialect.ending(outcome)
                if await sse.write(out):
                    last_write = loop.time()
                if outcome.finish_reason:
                    return await sse.end()
            until = min(last_write + timeouts.keepalive, last_token + timeouts.stall)
            if await stream.wait(until):
                continue
            if loop.time() >= last_token + timeouts.stall:
                return await sse.fail(stalled)
            await sse.write(sse.head() + dialect.keepalive)
            last_write = loop.time()
    finally:
        metrics.STREAM_WRITES.labels(model=dialect.model).inc(sse.writes)
        if outcome.finish_reason:
            metrics.STREAMED_TOKENS.labels(model=dialect.model).inc(outcome.completion_tokens)
        if resuming is not None and not resuming.done():
            resuming.cancel()  # the router closes what it opened
        if stream is not None:
            gateway.streams.discard(stream)
            stream.close()
        if opening.done():
            _close_opened(opening)
        else:  # the client left first: the opening stops, or closes what it opened
            opening.cancel()
            opening.add_done_callback(_close_opened)


def _close_opened(opening: asyncio.Task[Stream]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class _Events:
    """The SSE response, begun on its first write, which opens with ``head()``."""

    __slots__ = ("_opened", "dialect", "request", "response", "within", "writes")

    def __init__(self, request: web.Request, dialect: Dialect) -> None:
        self.request = request
        self.dialect = dialect
        self.response: web.StreamResponse | None = None
        self._opened = False
        self.within = request.app[GATEWAY].config.timeouts.write
        self.writes = 0

    def head(self) -> bytes:
        """The dialect's opening the first time (before what the first write carries, so an
        event sequence keeps its order); nothing after."""
        if self._opened:
            return b""
        self._opened = True
        return self.dialect.opening()

    async def write(self, data: bytes) -> bool:
        """Write ``data``; whether anything was written."""
        if self.response is None:
            self.response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                }
            )
            try:
                await self.response.prepare(self.request)
            except ConnectionResetError:
                raise self._gone() from None
        if not data:
            return False
        await self._send(data)
        return True

    async def keep_alive(self, task: asyncio.Task[Any], within: float) -> bool:
        """Wait for ``task`` while the dialect's keep-alives go out every
        ``timeouts.keepalive``; False if ``within`` seconds passed first."""
        loop = asyncio.get_running_loop()
        every = self.request.app[GATEWAY].config.timeouts.keepalive
        deadline = loop.time() + within
        while True:
            await asyncio.wait((task,), timeout=min(every, deadline - loop.time()))
            if task.done():
                return True
            if loop.time() >= deadline:
                return False
            await self.write(self.head() + self.dialect.keepalive)

    async def end(self) -> web.StreamResponse:
        assert self.response is not None
        try:
            async with self._bounded():
                await self.response.write_eof()
        except ConnectionResetError:
            raise self._gone() from None
        return self.response

    async def _send(self, data: bytes) -> None:
        assert self.response is not None
        self.writes += 1
        transport = self.request.transport
        try:
            if (
                transport is not None
                and transport.get_write_buffer_size() + len(data)
                <= transport.get_write_buffer_limits()[1]
            ):
                # Below the transport's high-water mark the write cannot wait on the client:
                # no timer (one per write is the streaming path's cost).
                await self.response.write(data)
                return
            async with self._bounded():
                await self.response.write(data)
        except ConnectionResetError:
            raise self._gone() from None

    def _gone(self) -> asyncio.CancelledError:
        """The client reset or closed its connection and a write found it before aiohttp
        cancelled the handler (which it does as the connection is lost): the handler ends
        the same way, a client gone, its generation cancelled."""
        if self.request.transport is not None:
            self.request.transport.abort()
        return asyncio.CancelledError()

    @contextlib.asynccontextmanager
    async def _bounded(self) -> AsyncIterator[None]:
        """A write that does not complete within ``timeouts.write`` (a client that stopped
        reading, its socket buffers full) drops the client: its handler ends as if it had
        gone, so its generation stops and its slots free."""
        try:
            async with asyncio.timeout(self.within):
                yield
        except TimeoutError:
            metrics.REJECTIONS.labels(reason="write_timeout").inc()
            log.info(
                "dropping a client that stopped reading request_id=%s model=%s",
                self.dialect.id, self.dialect.model,
            )  # fmt: skip
            if self.request.transport is not None:
                self.request.transport.abort()
            raise asyncio.CancelledError from None

    async def fail(self, error: CortexError) -> web.StreamResponse:
        """End the answer with ``error``: its HTTP status if nothing was sent yet, else the
        dialect's error event."""
        if self.response is None:
            raise error
        log.warning(
            "stream failed request_id=%s model=%s error=%s",
            self.dialect.id, self.dialect.model, error.message,
        )  # fmt: skip
        await self._send(self.dialect.failure(error))
        return await self.end()
