"""The OpenAI-compatible surface: chat completions, completions and models.

Handlers parse and validate the body (a wrong field is a 400 naming it) and hand ``Answer``,
which says how chat and completion answers look, to ``cortex.api.relay``: it opens the
generation, waits with keep-alives, and writes the JSON or SSE.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cortex.api import Gateway, fields, gateway_of
from cortex.api.errors import error_body
from cortex.api.relay import KEEPALIVE, Outcome, checked, read_body, relay
from cortex.errors import BadRequest, CortexError
from cortex.router import openai_param
from helexa.neuron.v1 import neuron_pb2 as pb

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_ROLES["tool"] = "tool"
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


def _common(gateway: Gateway, body: dict[str, Any], request: pb.GenerateRequest) -> Parsed:
    """The fields chat and completions share; fills ``request`` and resolves the model."""
    name = fields.model(body)
    n = fields.integer(body, "n")
    if n is not None and n != 1:
        raise BadRequest(f"'n' must be 1 (one choice per request), got {n}", param="n")
    limit = gateway.config.limits.max_tokens
    request.max_tokens_limit = limit  # also bounds a request that leaves max_tokens out
    for key in ("max_completion_tokens", "max_tokens"):
        value = fields.max_tokens(body, key, limit)
        if value is not None:
            request.max_tokens = value
            break
    fields.sampling(body, request)
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
    fields.constrain(request, tools, choice, parallel, output, "response_format")


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
    """How one surface (chat or completions) shapes its JSON and its SSE chunks: the relay's
    ``Dialect`` for them."""

    keepalive = KEEPALIVE

    def __init__(self, kind: str, parsed: Parsed) -> None:
        self.chat = kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.parsed = parsed
        self.model = parsed.model
        self.generate = generate = parsed.generate
        self.stream = parsed.stream
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

    def param(self, field: str) -> str:
        return openai_param(field)

    def opening(self) -> bytes:
        return b""

    delta = delta_chunk

    def ending(self, outcome: Outcome) -> bytes:
        end = self.chunk(None if self.chat else "", outcome.finish_reason)
        if self.parsed.include_usage:
            end += self.usage_chunk(outcome)
        return end + DONE

    def failure(self, error: CortexError) -> bytes:
        return _sse(error_body(error)) + DONE

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
    parsed = _parse(parse_chat, gateway, await read_body(request))
    return await relay(request, gateway, Answer("chat", parsed))


async def completions(request: web.Request) -> web.StreamResponse:
    gateway = gateway_of(request)
    parsed = _parse(parse_completion, gateway, await read_body(request))
    return await relay(request, gateway, Answer("completion", parsed))


def _parse(
    parse: Callable[[Gateway, dict[str, Any]], Parsed], gateway: Gateway, body: dict[str, Any]
) -> Parsed:
    return checked(parse, gateway, body)
