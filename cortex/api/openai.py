"""The OpenAI-compatible surface: chat completions, completions and models.

Handlers parse and validate the body (a wrong field is a 400 naming it), ask the router for a
stream of ``GenerateResponse`` messages, and write JSON or SSE. The stream is read on its own
task into a buffer: each SSE write carries everything that arrived while the previous write was
in flight (the first token goes out at once), keep-alive comments are sent while no token
comes, and a stream with no token for ``timeouts.stall`` ends with an error event. When the
client disconnects, aiohttp cancels the handler (``handler_cancellation``), which cancels the
reader task and with it the generation on the neuron, which stops generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cortex import metrics
from cortex.api import Gateway, gateway_of
from cortex.api.errors import error_body
from cortex.errors import BadRequest, BodyTooLarge, CortexError, NeuronFailed, StreamStalled
from helexa.neuron.v1 import neuron_pb2 as pb

log = logging.getLogger(__name__)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_ROLES["tool"] = "tool"
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
MAX_STOP = 16
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)


# ---- models ----


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "helexa"}


async def list_models(request: web.Request) -> web.Response:
    router = gateway_of(request).router
    return web.json_response(
        {"object": "list", "data": [_model_object(m) for m in router.model_ids()]}
    )


async def get_model(request: web.Request) -> web.Response:
    router = gateway_of(request).router
    model_id = router.resolve(request.match_info["model"])
    request["model_label"] = model_id
    return web.json_response(_model_object(model_id))


# ---- parsing ----


@dataclass(frozen=True)
class Parsed:
    """A validated request: the proto to send and how to answer."""

    model: str
    generate: pb.GenerateRequest
    stream: bool
    include_usage: bool


async def _body(request: web.Request) -> dict[str, Any]:
    limit = request.client_max_size
    if (request.content_length or 0) > limit:
        raise _too_large(limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
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


def _int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer, got {value!r}", param=name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or _nan(value):
        raise BadRequest(f"'{name}' must be a number, got {value!r}", param=name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low:g} and {high:g}, got {value}", param=name)
    return float(value)


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false, got {value!r}", param=name)
    return value


def _common(gateway: Gateway, body: dict[str, Any], request: pb.GenerateRequest) -> Parsed:
    """The fields chat and completions share; fills ``request`` and resolves the model."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' is required: a non-empty string", param="model")
    n = _int(body, "n")
    if n is not None and n != 1:
        raise BadRequest(f"'n' must be 1 (one choice per request), got {n}", param="n")
    limit = gateway.config.limits.max_tokens
    for field in ("max_completion_tokens", "max_tokens"):
        value = _int(body, field)
        if value is None:
            continue
        if value < 1:
            raise BadRequest(f"'{field}' must be at least 1, got {value}", param=field)
        if value > limit:
            raise BadRequest(f"'{field}' must be at most {limit}, got {value}", param=field)
        request.max_tokens = value
        break
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        request.temperature = temperature
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None:
        if top_p == 0:
            raise BadRequest("'top_p' must be greater than 0", param="top_p")
        request.top_p = top_p
    seed = _int(body, "seed")
    if seed is not None:
        request.seed = seed % (1 << 64)
    request.stop.extend(_stops(body.get("stop")))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("'user' must be a string", param="user")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object", param="stream_options")
        include_usage = _bool(options, "include_usage")
    if not stream:
        # The client wants the answer whole: the neuron sends it in one message (a message
        # costs both ends more than a token), with one at least every half stall timeout.
        request.message_interval = gateway.config.timeouts.stall / 2
    model_id = gateway.router.resolve(name)
    request.model = model_id
    return Parsed(model_id, request, stream, include_usage)


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP:
        raise BadRequest(f"'stop' takes at most {MAX_STOP} sequences", param="stop")
    return stops


def _content(value: Any, key: str) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(f"'{key}[{i}]': only text parts are supported", param=key)
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"'{key}[{i}].text' must be a string", param=f"{key}[{i}].text")
            texts.append(text)
        return "".join(texts)
    raise BadRequest(f"'{key}' must be a string or a list of text parts", param=key)


def parse_chat(gateway: Gateway, body: dict[str, Any]) -> Parsed:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of messages", param="messages")
    chat = pb.ChatMessages()
    for i, message in enumerate(messages):
        key = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"'{key}' must be an object", param=key)
        given = message.get("role")
        role = _ROLES.get(given) if isinstance(given, str) else None
        if role is None:
            raise BadRequest(
                f"'{key}.role' must be one of {', '.join(_ROLES)}, got {message.get('role')!r}",
                param=f"{key}.role",
            )
        chat.messages.append(
            pb.ChatMessage(role=role, content=_content(message.get("content"), f"{key}.content"))
        )
    return _common(gateway, body, pb.GenerateRequest(chat=chat))


def parse_completion(gateway: Gateway, body: dict[str, Any]) -> Parsed:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string", param="prompt")
    return _common(gateway, body, pb.GenerateRequest(prompt=prompt))


# ---- relaying the stream ----

_END = object()


class Relay:
    """Reads a router stream on its own task into a buffer the writer drains in batches."""

    def __init__(self, source: AsyncIterator[pb.GenerateResponse]) -> None:
        self._buffer: deque[Any] = deque()
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._read(source))

    async def _read(self, source: AsyncIterator[pb.GenerateResponse]) -> None:
        try:
            async for message in source:
                self._buffer.append(message)
                self._arrived.set()
            self._buffer.append(_END)
        except CortexError as e:
            self._buffer.append(e)
        except Exception as e:
            log.exception("relay failed")
            self._buffer.append(NeuronFailed(f"relay failed: {type(e).__name__}: {e}"))
        finally:
            self._arrived.set()

    async def next(self, within: float) -> list[Any] | None:
        """Everything that arrived since the last call; None if nothing did within ``within``."""
        if not self._buffer:
            self._arrived.clear()
            try:
                async with asyncio.timeout(max(within, 0.0)):  # no task, unlike wait_for
                    await self._arrived.wait()
            except TimeoutError:
                return None
        items = list(self._buffer)
        self._buffer.clear()
        return items

    async def close(self) -> None:
        """Cancel the read (and so the generation) if it is still going."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class Outcome:
    """What a finished generation came to."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _absorb(outcome: Outcome, message: pb.GenerateResponse) -> str:
    """Fold one message into ``outcome``; returns its text."""
    if message.finish_reason == pb.FINISH_REASON_CANCELLED:
        raise NeuronFailed("the neuron cancelled the generation (it is shutting down)")
    if message.finish_reason:
        outcome.finish_reason = _FINISH.get(message.finish_reason, "stop")
        outcome.prompt_tokens = message.usage.prompt_tokens
        outcome.completion_tokens = message.usage.completion_tokens
    return message.text


def _usage(outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


class Answer:
    """How one surface (chat or completions) shapes its JSON and its SSE chunks."""

    def __init__(self, kind: str, parsed: Parsed) -> None:
        self.chat = kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.parsed = parsed
        self._around_text: tuple[bytes, bytes] | None = None

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.parsed.model}

    def whole(self, outcome: Outcome) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": outcome.text},
                "finish_reason": outcome.finish_reason,
                "logprobs": None,
            }
            body = self._base("chat.completion")
        else:
            choice = {
                "index": 0,
                "text": outcome.text,
                "finish_reason": outcome.finish_reason,
                "logprobs": None,
            }
            body = self._base("text_completion")
        return {**body, "choices": [choice], "usage": _usage(outcome)}

    def chunk(self, text: str | None, finish_reason: str | None, role: bool = False) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or ""}
            body = self._base("text_completion")
        choice["finish_reason"] = finish_reason
        choice["logprobs"] = None
        body["choices"] = [choice]
        if self.parsed.include_usage:
            body["usage"] = None
        return _sse(body)

    def text_chunk(self, text: str) -> bytes:
        """``chunk(text, None)``, the one sent per write: only the text is encoded each time."""
        if self._around_text is None:
            head, _, tail = self.chunk("\0", None).partition(json.dumps("\0").encode())
            self._around_text = head, tail
        head, tail = self._around_text
        return head + json.dumps(text).encode() + tail

    def usage_chunk(self, outcome: Outcome) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return _sse({**self._base(kind), "choices": [], "usage": _usage(outcome)})


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway = gateway_of(request)
    parsed = _parse(parse_chat, gateway, await _body(request))
    return await _answer(request, gateway, Answer("chat", parsed))


async def completions(request: web.Request) -> web.StreamResponse:
    gateway = gateway_of(request)
    parsed = _parse(parse_completion, gateway, await _body(request))
    return await _answer(request, gateway, Answer("completion", parsed))


def _parse(
    parse: Callable[[Gateway, dict[str, Any]], Parsed], gateway: Gateway, body: dict[str, Any]
) -> Parsed:
    try:
        return parse(gateway, body)
    except UnicodeEncodeError:  # JSON may escape a lone surrogate; protobuf strings cannot hold it
        raise BadRequest(
            "The request holds a string that is not valid Unicode (a lone surrogate such as "
            "\\ud800)"
        ) from None


async def _answer(request: web.Request, gateway: Gateway, answer: Answer) -> web.StreamResponse:
    parsed = answer.parsed
    request["model_label"] = parsed.model
    parsed.generate.request_id = answer.id
    arrived = time.monotonic()
    messages = gateway.router.generate(parsed.model, parsed.generate)
    if not parsed.stream:
        return await _whole(gateway, answer, messages)
    relay = Relay(messages)
    try:
        return await _stream(request, gateway, answer, relay, arrived)
    finally:
        await relay.close()


def _first_token_seen(answer: Answer, arrived: float) -> Callable[[], None]:
    seen = False

    def mark() -> None:
        nonlocal seen
        if not seen:
            seen = True
            metrics.TIME_TO_FIRST_TOKEN.labels(model=answer.parsed.model).observe(
                time.monotonic() - arrived
            )

    return mark


async def _whole(
    gateway: Gateway, answer: Answer, messages: AsyncGenerator[pb.GenerateResponse, None]
) -> web.Response:
    """The answer as one JSON body. Its tokens come held together (``message_interval``), so
    there is no first-token time, and no relay task: the messages are read here."""
    timeouts = gateway.config.timeouts
    outcome = Outcome()
    parts: list[str] = []
    # Before the first message a placement may run (bounded by timeouts.load).
    within = timeouts.load + timeouts.stall
    try:
        while True:
            try:
                async with asyncio.timeout(within):  # cancels the read, and so the call
                    message = await anext(messages)
            except StopAsyncIteration:
                outcome.text = "".join(parts)
                return web.json_response(answer.whole(outcome))
            except TimeoutError:
                raise StreamStalled(f"no token from the neuron within {within:g} seconds") from None
            within = timeouts.stall
            parts.append(_absorb(outcome, message))
    finally:
        await messages.aclose()


async def _stream(
    request: web.Request, gateway: Gateway, answer: Answer, relay: Relay, arrived: float
) -> web.StreamResponse:
    timeouts = gateway.config.timeouts
    outcome = Outcome()
    mark_first = _first_token_seen(answer, arrived)
    response: web.StreamResponse | None = None
    started = False  # the role chunk went out
    first_deadline = time.monotonic() + timeouts.load + timeouts.stall
    last_token = 0.0

    async def open_response() -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        return resp

    while True:
        now = time.monotonic()
        deadline = first_deadline if not last_token else last_token + timeouts.stall
        if now >= deadline:
            error = StreamStalled(f"no token from the neuron for {timeouts.stall:g} seconds")
            if response is None:
                raise error
            log.warning("stream stalled request_id=%s model=%s", answer.id, answer.parsed.model)
            await response.write(_sse(error_body(error)) + DONE)
            await response.write_eof()
            return response
        items = await relay.next(min(timeouts.keepalive, deadline - now))
        if items is None:
            # Nothing yet: commit to the stream so the keep-alive reaches the client.
            if response is None:
                response = await open_response()
            await response.write(KEEPALIVE)
            continue
        out: list[bytes] = []
        text: list[str] = []
        ended = failure = None
        for item in items:
            if item is _END:
                ended = True
                break
            if isinstance(item, CortexError):
                failure = item
                break
            try:
                text.append(_absorb(outcome, item))
            except CortexError as e:
                failure = e
                break
            mark_first()
            last_token = time.monotonic()
        if failure is not None and response is None and not started:
            raise failure  # nothing sent yet: a proper HTTP status
        if response is None:
            response = await open_response()
        if answer.chat and not started and (text or ended):
            out.append(answer.chunk("", None, role=True))
            started = True
        joined = "".join(text)
        if joined:
            out.append(answer.text_chunk(joined))
        if failure is not None:
            log.warning(
                "stream failed request_id=%s model=%s error=%s",
                answer.id, answer.parsed.model, failure.message,
            )  # fmt: skip
            out.append(_sse(error_body(failure)) + DONE)
        elif ended:
            out.append(answer.chunk(None if answer.chat else "", outcome.finish_reason or "stop"))
            if answer.parsed.include_usage:
                out.append(answer.usage_chunk(outcome))
            out.append(DONE)
        if out:
            await response.write(b"".join(out))
        if failure is not None or ended:
            await response.write_eof()
            return response
