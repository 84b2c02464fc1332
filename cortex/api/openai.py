"""The OpenAI-compatible surface: chat completions, completions and models.

Handlers parse and validate the body (a wrong field is a 400 naming it), ask the router to open
a stream of ``GenerateResponse`` messages, and write JSON or SSE. The opening (placement,
retries, the first message) runs on its own task while keep-alive comments go out; then the
handler takes the messages straight from the generation's buffer: each SSE write carries
everything that arrived while the previous write was in flight (the first token goes out at
once), keep-alive comments are sent while no token comes, and a stream with no token for
``timeouts.stall`` ends with an error event. When the client disconnects, aiohttp cancels the
handler (``handler_cancellation``), which closes the stream and so cancels the generation on
the neuron, which stops generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from cortex import metrics
from cortex.api import Gateway, fields, gateway_of
from cortex.api.errors import error_body
from cortex.errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    CortexError,
    NeuronFailed,
    StreamStalled,
)
from cortex.router import Stream
from helexa.neuron.v1 import neuron_pb2 as pb

log = logging.getLogger(__name__)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_ROLES["tool"] = "tool"
_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
MAX_STOP = 16
MAX_COMPLETION_LOGPROBS = 5
# Fields of OpenAI's chat API that cortex does not serve: refused by name, never ignored.
_CHAT_UNSUPPORTED = {
    "audio": "audio output is not served; only text",
    "functions": "deprecated by OpenAI; use 'tools'",
    "function_call": "deprecated by OpenAI; use 'tool_choice'",
    "prediction": "predicted outputs are not served",
    "web_search_options": "web search is not served",
}
_COMPLETION_UNSUPPORTED = {
    "suffix": "insertion (a suffix) is not served",
    "tools": "tools are served on /v1/chat/completions",
    "tool_choice": "tools are served on /v1/chat/completions",
    "parallel_tool_calls": "tools are served on /v1/chat/completions",
    "response_format": "output formats are served on /v1/chat/completions",
}
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)


# ---- models ----


def _model_object(model_id: str, created: int) -> dict[str, Any]:
    # created: when this cortex started (and read its catalogue); the neurons' load times
    # change with every placement, and clients take the field as the model's age.
    return {"id": model_id, "object": "model", "created": created, "owned_by": "helexa"}


async def list_models(request: web.Request) -> web.Response:
    gateway = gateway_of(request)
    data = [_model_object(m, gateway.started) for m in gateway.router.model_ids()]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    gateway = gateway_of(request)
    model_id = gateway.router.resolve(request.match_info["model"])
    request["model_label"] = model_id
    return web.json_response(_model_object(model_id, gateway.started))


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
    within = gateway_of(request).config.timeouts.body
    try:
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


def _common(gateway: Gateway, body: dict[str, Any], request: pb.GenerateRequest) -> Parsed:
    """The fields chat and completions share; fills ``request`` and resolves the model."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' is required: a non-empty string", param="model")
    n = fields.integer(body, "n")
    if n is not None and n != 1:
        raise BadRequest(f"'n' must be 1 (one choice per request), got {n}", param="n")
    limit = gateway.config.limits.max_tokens
    request.max_tokens_limit = limit  # also bounds a request that leaves max_tokens out
    for key in ("max_completion_tokens", "max_tokens"):
        value = fields.integer(body, key)
        if value is None:
            continue
        if value < 1:
            raise BadRequest(f"'{key}' must be at least 1, got {value}", param=key)
        if value > limit:
            raise BadRequest(f"'{key}' must be at most {limit}, got {value}", param=key)
        request.max_tokens = value
        break
    temperature = fields.number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        request.temperature = temperature
    top_p = fields.number(body, "top_p", 0.0, 1.0)
    if top_p is not None:
        if top_p == 0:
            raise BadRequest("'top_p' must be greater than 0", param="top_p")
        request.top_p = top_p
    for key in ("presence_penalty", "frequency_penalty"):
        penalty = fields.number(body, key, -2.0, 2.0)
        if penalty is not None:
            setattr(request, key, penalty)
    request.logit_bias.update(fields.logit_bias(body.get("logit_bias")))
    seed = fields.integer(body, "seed")
    if seed is not None:
        request.seed = seed % (1 << 64)
    request.stop.extend(_stops(body.get("stop")))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("'user' must be a string", param="user")
    stream = bool(fields.boolean(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object", param="stream_options")
        include_usage = bool(fields.boolean(options, "include_usage", "stream_options"))
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
        for i, part in enumerate(fields.items(value, key, "content parts", fields.MAX_PARTS)):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(f"'{key}[{i}]': only text parts are supported", param=key)
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"'{key}[{i}].text' must be a string", param=f"{key}[{i}].text")
            texts.append(text)
        return "".join(texts)
    raise BadRequest(f"'{key}' must be a string or a list of text parts", param=key)


def parse_chat(gateway: Gateway, body: dict[str, Any]) -> Parsed:
    messages = fields.items(body.get("messages"), "messages", "messages", fields.MAX_MESSAGES)
    if not messages:
        raise BadRequest("'messages' must be a non-empty list of messages", param="messages")
    chat = pb.ChatMessages()
    call_ids: set[str] = set()  # the calls so far, which tool messages answer
    for i, message in enumerate(messages):
        chat.messages.append(_message(message, f"messages[{i}]", call_ids))
    fields.refuse(body, _CHAT_UNSUPPORTED)
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise BadRequest("'modalities' must be [\"text\"]: only text is served", param="modalities")
    request = pb.GenerateRequest(chat=chat)
    _tools(body, request)
    logprobs = fields.boolean(body, "logprobs")
    top = fields.integer(body, "top_logprobs")
    if top is not None:
        if not logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if not 0 <= top <= fields.MAX_TOP_LOGPROBS:
            raise BadRequest(
                f"'top_logprobs' must be between 0 and {fields.MAX_TOP_LOGPROBS}, got {top}",
                param="top_logprobs",
            )
        request.top_logprobs = top
    request.logprobs = bool(logprobs)
    return _common(gateway, body, request)


def _message(message: Any, key: str, call_ids: set[str]) -> pb.ChatMessage:
    """One message of a chat; an assistant's may carry tool calls (and no content), a tool's
    answers one of them by id."""
    if not isinstance(message, dict):
        raise BadRequest(f"'{key}' must be an object", param=key)
    given = message.get("role")
    role = _ROLES.get(given) if isinstance(given, str) else None
    if role is None:
        raise BadRequest(
            f"'{key}.role' must be one of {', '.join(_ROLES)}, got {message.get('role')!r}",
            param=f"{key}.role",
        )
    out = pb.ChatMessage(role=role, content=_content(message.get("content"), f"{key}.content"))
    if message.get("tool_calls") is not None:
        if role != "assistant":
            raise BadRequest(
                f"'{key}.tool_calls': only assistant messages carry tool calls",
                param=f"{key}.tool_calls",
            )
        out.tool_calls.extend(fields.tool_calls(message["tool_calls"], f"{key}.tool_calls"))
        call_ids.update(call.id for call in out.tool_calls)
    if role == "tool":
        out.tool_call_id = fields.string(message, "tool_call_id", key, required=True)
        if out.tool_call_id not in call_ids:
            raise BadRequest(
                f"'{key}.tool_call_id' must answer a call of an earlier assistant message, "
                f"got {out.tool_call_id!r}",
                param=f"{key}.tool_call_id",
            )
    return out


def _tools(body: dict[str, Any], request: pb.GenerateRequest) -> None:
    """``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format`` into
    ``request``."""
    tools = fields.tools(body.get("tools"))
    choice = fields.tool_choice(body.get("tool_choice"), [t.name for t in tools])
    parallel = fields.boolean(body, "parallel_tool_calls")
    output = fields.response_format(body.get("response_format"))
    if tools:
        request.tools.extend(tools)
        if choice is not None:
            request.tool_choice.CopyFrom(choice)
        if parallel is not None:
            request.parallel_tool_calls = parallel
    if output is None:
        return
    mode = request.tool_choice.mode
    if tools and mode == pb.TOOL_CHOICE_MODE_AUTO:
        # The answer is text or calls: the neuron cannot hold the text to a format and leave
        # calls free at once.
        raise BadRequest(
            "'response_format' with 'tools' is served only with tool_choice 'none', "
            "'required' or a named function, not 'auto'",
            param="response_format",
        )
    if not tools or mode == pb.TOOL_CHOICE_MODE_NONE:  # forced calls leave no text to format
        request.output.CopyFrom(output)


def parse_completion(gateway: Gateway, body: dict[str, Any]) -> Parsed:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string", param="prompt")
    fields.refuse(body, _COMPLETION_UNSUPPORTED)
    if fields.boolean(body, "echo"):
        raise BadRequest(
            "'echo' is not supported: the answer holds only the completion", param="echo"
        )
    best_of = fields.integer(body, "best_of")
    if best_of is not None and best_of != 1:
        raise BadRequest(
            f"'best_of' must be 1 (one choice per request), got {best_of}", param="best_of"
        )
    request = pb.GenerateRequest(prompt=prompt)
    logprobs = fields.integer(body, "logprobs")
    if logprobs is not None:
        if not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            raise BadRequest(
                f"'logprobs' must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {logprobs}",
                param="logprobs",
            )
        request.logprobs = True
        request.top_logprobs = logprobs
    return _common(gateway, body, request)


# ---- answering ----


@dataclass
class Outcome:
    """What a generation came to: its finish and usage, and for a whole answer everything."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    tool_calls: list[pb.ToolCallDelta] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)


def _absorb(outcome: Outcome, message: pb.GenerateResponse) -> str:
    """Fold one message's finish and usage into ``outcome``; returns its text."""
    if message.finish_reason == pb.FINISH_REASON_CANCELLED:
        raise NeuronFailed("the neuron cancelled the generation (it is shutting down)")
    if message.finish_reason:
        outcome.finish_reason = _FINISH.get(message.finish_reason, "stop")
        outcome.prompt_tokens = message.usage.prompt_tokens
        outcome.completion_tokens = message.usage.completion_tokens
        outcome.cached_tokens = message.usage.cached_prompt_tokens
    return message.text


def _usage(outcome: Outcome) -> dict[str, Any]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


def merge_calls(deltas: Iterable[pb.ToolCallDelta]) -> list[dict[str, Any]]:
    """Tool-call pieces as OpenAI's streamed ``tool_calls`` entries, one per call (by index):
    the piece that opens a call carries its id, type and name; the arguments are joined."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        call = calls.get(delta.index)
        if call is None:
            call = calls[delta.index] = {"index": delta.index}
            if delta.id or delta.name:
                call |= {"id": delta.id, "type": "function"}
                call["function"] = {"name": delta.name, "arguments": ""}
            else:
                call["function"] = {"arguments": ""}
        call["function"]["arguments"] += delta.arguments
    return list(calls.values())


def _logprob(value: float) -> float:
    # JSON has no -Infinity: OpenAI writes -9999.0 for a token that cannot be sampled.
    return value if math.isfinite(value) else -9999.0


def _chat_logprobs(tokens: list[pb.TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": _logprob(t.logprob),
                "bytes": list(t.bytes),
                "top_logprobs": [
                    {"token": o.token, "logprob": _logprob(o.logprob), "bytes": list(o.bytes)}
                    for o in t.top
                ],
            }
            for t in tokens
        ],
        "refusal": None,
    }


class Answer:
    """How one surface (chat or completions) shapes its JSON and its SSE chunks."""

    def __init__(self, kind: str, parsed: Parsed) -> None:
        self.chat = kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.parsed = parsed
        generate = parsed.generate
        self.logprobs = generate.logprobs
        # Whether messages may carry more than text (else each write is a text chunk).
        self.rich = generate.logprobs or bool(generate.tools)
        self._offset = 0  # completions: characters of text before the next token's
        self._around_text: tuple[bytes, bytes] | None = None

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.parsed.model}

    def whole(self, outcome: Outcome) -> dict[str, Any]:
        logprobs = self._logprobs(outcome.logprobs) if self.logprobs else None
        if self.chat:
            calls = merge_calls(outcome.tool_calls)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": outcome.text if outcome.text or not calls else None,
                "refusal": None,
            }
            if calls:
                message["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": c["function"]} for c in calls
                ]
            choice: dict[str, Any] = {"index": 0, "message": message}
            body = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": outcome.text}
            body = self._base("text_completion")
        choice |= {"finish_reason": outcome.finish_reason, "logprobs": logprobs}
        return {**body, "choices": [choice], "usage": _usage(outcome)}

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None,
        role: bool = False,
        tool_calls: list[pb.ToolCallDelta] | None = None,
        logprobs: list[pb.TokenLogprob] | None = None,
    ) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None or role:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = merge_calls(tool_calls)
            choice: dict[str, Any] = {"index": 0, "delta": delta}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or ""}
            body = self._base("text_completion")
        choice["finish_reason"] = finish_reason
        choice["logprobs"] = self._logprobs(logprobs) if logprobs else None
        body["choices"] = [choice]
        if self.parsed.include_usage:
            body["usage"] = None
        return _sse(body)

    def delta_chunk(self, text: str, messages: list[pb.GenerateResponse], first: bool) -> bytes:
        """What one write carries of ``messages`` (whose text is ``text``): the text chunk
        alone, unless they also hold tool calls or logprobs; the chat's role first."""
        calls: list[pb.ToolCallDelta] = []
        logprobs: list[pb.TokenLogprob] = []
        if self.rich:
            for message in messages:
                calls.extend(message.tool_calls)
                logprobs.extend(message.logprobs)
        head = b""
        if first and self.chat:  # content null when the answer opens with a call, as OpenAI's
            head = self.chunk(None if calls and not text else "", None, role=True)
        if calls or logprobs:
            return head + self.chunk(text or None, None, tool_calls=calls, logprobs=logprobs)
        return head + self.text_chunk(text) if text else head

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

    def _logprobs(self, tokens: list[pb.TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            return _chat_logprobs(tokens)
        # Completions: each token's top alternatives as {token: logprob}, the sampled one
        # always among them; offsets count characters of the answer's text.
        offsets = []
        tops = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(t.token)
            top = {o.token: _logprob(o.logprob) for o in t.top}
            top.setdefault(t.token, _logprob(t.logprob))
            tops.append(top)
        return {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [_logprob(t.logprob) for t in tokens],
            "top_logprobs": tops,
            "text_offset": offsets,
        }


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


def constraint(request: pb.GenerateRequest) -> str | None:
    """What the neuron holds the output to: ``json_object``, ``json_schema``, ``tools``."""
    output = request.output.WhichOneof("kind")
    if output is not None:
        return output
    if request.tools and request.tool_choice.mode != pb.TOOL_CHOICE_MODE_NONE:
        return "tools"
    return None


async def _answer(request: web.Request, gateway: Gateway, answer: Answer) -> web.StreamResponse:
    parsed = answer.parsed
    request["model_label"] = parsed.model
    parsed.generate.request_id = answer.id
    kind = constraint(parsed.generate)
    if kind is not None:
        metrics.CONSTRAINED.labels(kind=kind).inc()
    arrived = time.monotonic()
    opening = gateway.router.open(parsed.model, parsed.generate)
    if not parsed.stream:
        return await _whole(gateway, answer, opening)
    return await _stream(request, gateway, answer, asyncio.create_task(opening), arrived)


async def _whole(
    gateway: Gateway, answer: Answer, opening: Coroutine[Any, Any, Stream]
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
    try:
        while True:
            for message in stream.take():
                parts.append(_absorb(outcome, message))
                outcome.tool_calls.extend(message.tool_calls)
                outcome.logprobs.extend(message.logprobs)
            if outcome.finish_reason:
                outcome.text = "".join(parts)
                return web.json_response(answer.whole(outcome))
            if not await stream.wait(loop.time() + timeouts.stall):
                raise StreamStalled(f"no token from the neuron within {timeouts.stall:g} seconds")
    finally:
        stream.close()


async def _stream(
    request: web.Request,
    gateway: Gateway,
    answer: Answer,
    opening: asyncio.Task[Stream],
    arrived: float,
) -> web.StreamResponse:
    """The answer as SSE. Each write carries every message that came while the last one was
    in flight; the response opens with the first message, or with the first keep-alive."""
    timeouts = gateway.config.timeouts
    loop = asyncio.get_running_loop()
    response: web.StreamResponse | None = None
    stalled = StreamStalled(f"no token from the neuron for {timeouts.stall:g} seconds")
    try:
        # Until the first message a placement may run (bounded by timeouts.load).
        deadline = loop.time() + timeouts.load + timeouts.stall
        while True:
            await asyncio.wait((opening,), timeout=min(timeouts.keepalive, deadline - loop.time()))
            if opening.done():
                break
            if loop.time() >= deadline:
                return await _fail(answer, response, stalled)
            response = response or await _begin(request)
            await response.write(KEEPALIVE)
        try:
            stream = opening.result()
        except CortexError as e:
            return await _fail(answer, response, e)
        metrics.TIME_TO_FIRST_TOKEN.labels(model=answer.parsed.model).observe(
            time.monotonic() - arrived
        )
        outcome = Outcome()
        first = True
        last_token = last_write = loop.time()
        while True:
            try:
                messages = stream.take()
                text = "".join([_absorb(outcome, message) for message in messages])
            except CortexError as e:
                return await _fail(answer, response, e)
            if messages:
                last_token = loop.time()
                out = [answer.delta_chunk(text, messages, first)]
                first = False
                if outcome.finish_reason:
                    out.append(answer.chunk(None if answer.chat else "", outcome.finish_reason))
                    if answer.parsed.include_usage:
                        out.append(answer.usage_chunk(outcome))
                    out.append(DONE)
                response = response or await _begin(request)
                joined = b"".join(out)
                if joined:
                    await response.write(joined)
                    last_write = loop.time()
                if outcome.finish_reason:
                    await response.write_eof()
                    return response
            until = min(last_write + timeouts.keepalive, last_token + timeouts.stall)
            if await stream.wait(until):
                continue
            if loop.time() >= last_token + timeouts.stall:
                return await _fail(answer, response, stalled)
            response = response or await _begin(request)
            await response.write(KEEPALIVE)
            last_write = loop.time()
    finally:
        if opening.done():
            _close_opened(opening)
        else:  # the client left first: the opening stops, or closes what it opened
            opening.cancel()
            opening.add_done_callback(_close_opened)


def _close_opened(opening: asyncio.Task[Stream]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


async def _begin(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


async def _fail(
    answer: Answer, response: web.StreamResponse | None, error: CortexError
) -> web.StreamResponse:
    """End the answer with ``error``: its HTTP status if nothing was sent yet, else an error
    event."""
    if response is None:
        raise error
    log.warning(
        "stream failed request_id=%s model=%s error=%s",
        answer.id, answer.parsed.model, error.message,
    )  # fmt: skip
    await response.write(_sse(error_body(error)) + DONE)
    await response.write_eof()
    return response
