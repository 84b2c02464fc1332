"""Anthropic's Messages API: ``POST /v1/messages`` (whole or streamed) and
``POST /v1/messages/count_tokens``, for clients built on the ``anthropic`` SDK.

The handlers parse Anthropic's request into the neuron's ``GenerateRequest`` (a system prompt,
turns of text, ``tool_use`` and ``tool_result`` blocks, tools with their ``input_schema``, the
tool choice, ``output_config.format``) and hand it to ``cortex.api.relay`` with a ``Message``,
the relay's ``Dialect`` for Anthropic's message or its event sequence (``message_start``, with
the prompt's usage from the first message; content blocks of ``text_delta`` or
``input_json_delta``; ``message_delta``, ``message_stop``; ``ping`` while a request waits, even
before ``message_start``; ``error`` when a stream fails after it began). Failures take
Anthropic's envelope in the middleware (``cortex.api.errors``). Fields that only steer Anthropic's own
service (``thinking``, ``cache_control``, ``service_tier``, ``speed``, ``output_config.effort``)
are accepted without effect; what cortex cannot serve (images, documents, server tools) is a
400 naming it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cortex.api import Gateway, fields, gateway_of
from cortex.api.errors import anthropic_error_body
from cortex.api.relay import Outcome, checked, read_body, relay
from cortex.errors import BadRequest, CortexError
from helexa.neuron.v1 import neuron_pb2 as pb

MAX_STOP_SEQUENCES = 16
MAX_TOP_K = 1 << 31
# Top-level fields of Anthropic's API that cortex cannot serve: refused by name.
_UNSUPPORTED = {
    "container": "code execution containers are not served",
    "mcp_servers": "the MCP connector is not served",
}
_SERVED_BLOCKS = "only text, tool_use and tool_result blocks are served"
# The neuron's finish reasons (in relay's words) as Anthropic's stop reasons.
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
PING = b'event: ping\ndata: {"type":"ping"}\n\n'
# The neuron names fields after the proto; the first pattern the whole path matches names the
# client's field (a chat message is named by the turn it came from: ``Parsed.param``).
_PARAMS = [
    (re.compile(p), name)
    for p, name in (
        (r"tools\[(\d+)\]\.parameters", r"tools[\1].input_schema"),
        (r"tools\[(\d+)\]\.(name|description)", r"tools[\1].\2"),
        (r"tool_choice(\..*)?", "tool_choice"),
        (r"chat\.messages|input", "messages"),
    )
]  # fmt: skip
_PROTO_MESSAGE = re.compile(r"chat\.messages\[(\d+)\].*")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)


# ---- parsing ----


@dataclass(frozen=True)
class Parsed:
    """A validated request: the proto to send, whether to stream, and which field of the
    client's each of the proto's chat messages came from (to name it in the neuron's errors)."""

    model: str
    generate: pb.GenerateRequest
    stream: bool
    origins: tuple[str, ...]
    output_key: str = "output_config.format"  # or the older beta "output_format"

    def param(self, field: str) -> str:
        """The client's name of a proto field the neuron named (``tools[2].parameters`` is
        ``tools[2].input_schema``; ``chat.messages[3].content`` the turn it came from)."""
        message = _PROTO_MESSAGE.fullmatch(field)
        if message is not None:
            index = int(message.group(1))
            return self.origins[index] if index < len(self.origins) else "messages"
        if field == "output.json_schema":
            return f"{self.output_key}.schema"
        if field in ("output", "output.json_object"):
            return self.output_key
        for pattern, name in _PARAMS:
            match = pattern.fullmatch(field)
            if match is not None:
                return match.expand(name)
        return field


def parse_messages(gateway: Gateway, body: dict[str, Any]) -> Parsed:
    """A ``/v1/messages`` body: ``max_tokens`` required."""
    return _parse(gateway, body, counting=False)


def parse_count(gateway: Gateway, body: dict[str, Any]) -> Parsed:
    """A ``/v1/messages/count_tokens`` body: the same fields, without ``max_tokens``."""
    return _parse(gateway, body, counting=True)


def _parse(gateway: Gateway, body: dict[str, Any], counting: bool) -> Parsed:
    name = fields.model(body)
    chat, origins = _conversation(body)
    fields.refuse(body, _UNSUPPORTED)
    request = pb.GenerateRequest(chat=chat)
    offered = _tools(body.get("tools"))
    choice, parallel = _tool_choice(body.get("tool_choice"), [t.name for t in offered])
    output, output_key = _output(body)
    fields.constrain(request, offered, choice, parallel, output, output_key)
    if not counting:
        _sampling(gateway, body, request)
    _accepted_without_effect(body)
    stream = bool(fields.boolean(body, "stream")) and not counting
    if not stream:
        # A whole answer: the neuron sends it in one message (see the OpenAI surface).
        request.message_interval = gateway.config.timeouts.stall / 2
    model_id = gateway.router.resolve(name)
    request.model = model_id
    return Parsed(model_id, request, stream, tuple(origins), output_key)


def _sampling(gateway: Gateway, body: dict[str, Any], request: pb.GenerateRequest) -> None:
    limit = gateway.config.limits.max_tokens
    request.max_tokens_limit = limit  # max_tokens is required, but every surface sends it
    max_tokens = fields.max_tokens(body, "max_tokens", limit)
    if max_tokens is None:
        raise BadRequest("'max_tokens' is required: an integer of at least 1", param="max_tokens")
    request.max_tokens = max_tokens
    fields.sampling(body, request, hottest=1.0)
    top_k = fields.integer(body, "top_k")
    if top_k is not None:
        if not 0 <= top_k < MAX_TOP_K:
            raise BadRequest(f"'top_k' must be 0 or more, got {top_k}", param="top_k")
        request.top_k = top_k
    stops = body.get("stop_sequences")
    request.stop.extend(fields.stop_strings(stops, "stop_sequences", MAX_STOP_SEQUENCES))
    metadata = body.get("metadata")
    if metadata is not None:
        fields.string(fields.obj(metadata, "metadata"), "user_id", "metadata")


def _accepted_without_effect(body: dict[str, Any]) -> None:
    """Fields that steer only Anthropic's own service: their shape is checked, no more."""
    thinking = body.get("thinking")
    if thinking is not None:
        kind = fields.obj(thinking, "thinking").get("type")
        if kind not in ("enabled", "disabled", "adaptive"):
            raise BadRequest(
                f"'thinking.type' must be 'enabled', 'disabled' or 'adaptive', got {kind!r}",
                param="thinking.type",
            )
    for key in ("service_tier", "speed", "inference_geo"):
        fields.string(body, key)


def _conversation(body: dict[str, Any]) -> tuple[pb.ChatMessages, list[str]]:
    """``system`` and ``messages`` as the proto's chat, with each message's origin."""
    chat = pb.ChatMessages()
    origins: list[str] = []
    system = body.get("system")
    if system is not None:
        chat.messages.append(pb.ChatMessage(role="system", content=_text(system, "system")))
        origins.append("system")
    turns = fields.items(body.get("messages"), "messages", "messages", fields.MAX_MESSAGES)
    if not turns:
        raise BadRequest("'messages' must be a non-empty list of messages", param="messages")
    call_ids: set[str] = set()  # the tool_use ids so far, which tool_result blocks answer
    for i, turn in enumerate(turns):
        key = f"messages[{i}]"
        for message in _turn(turn, key, call_ids):
            chat.messages.append(message)
            origins.append(key)
    if turns[-1].get("role") == "assistant":
        key = f"messages[{len(turns) - 1}]"
        raise BadRequest(
            f"'{key}': a conversation that ends with an assistant turn (prefill) is not served; "
            "end it with a user turn",
            param=key,
        )
    return chat, origins


def _text(value: Any, key: str) -> str:
    """A string, or a list of text blocks joined (``system``, a tool_result's content)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRequest(f"'{key}' must be a string or a list of text blocks", param=key)
    texts = []
    for j, block in enumerate(fields.items(value, key, "content blocks", fields.MAX_PARTS)):
        here = f"{key}[{j}]"
        kind = fields.obj(block, here).get("type")
        if kind != "text":
            raise BadRequest(
                f"'{here}': {kind!r} blocks are not served here; only text", param=here
            )
        texts.append(fields.string(block, "text", here, required=False))
    return "".join(texts)


def _turn(turn: Any, key: str, call_ids: set[str]) -> list[pb.ChatMessage]:
    """One of Anthropic's turns as the proto's messages: a user turn's tool_result blocks each
    become a ``tool`` message (in order, its text a ``user`` message), an assistant turn's
    text and tool_use blocks one ``assistant`` message with calls."""
    given = fields.obj(turn, key)
    role = given.get("role")
    if role not in ("user", "assistant"):
        raise BadRequest(
            f"'{key}.role' must be 'user' or 'assistant', got {role!r}", param=f"{key}.role"
        )
    content = given.get("content")
    if isinstance(content, str):
        return [pb.ChatMessage(role=role, content=content)]
    if not isinstance(content, list):
        raise BadRequest(
            f"'{key}.content' must be a string or a list of content blocks", param=f"{key}.content"
        )
    out: list[pb.ChatMessage] = []
    texts: list[str] = []
    calls: list[pb.ToolCall] = []
    blocks = fields.items(content, f"{key}.content", "content blocks", fields.MAX_PARTS)
    for j, block in enumerate(blocks):
        here = f"{key}.content[{j}]"
        kind = fields.obj(block, here).get("type")
        if kind == "text":
            texts.append(fields.string(block, "text", here))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_call(block, here))
            call_ids.add(calls[-1].id)
        elif kind == "tool_result" and role == "user":
            if texts:  # text before a result stays before it
                out.append(pb.ChatMessage(role="user", content="".join(texts)))
                texts = []
            out.append(_result(block, here, call_ids))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # another model's reasoning: this one does not read it
        elif kind in ("tool_use", "tool_result"):
            raise BadRequest(
                f"'{here}': {kind} blocks belong in {'an assistant' if role == 'user' else 'a user'}"
                " turn",
                param=here,
            )
        else:
            raise BadRequest(
                f"'{here}': {kind!r} blocks are not served; {_SERVED_BLOCKS}", param=here
            )
    if role == "assistant":
        message = pb.ChatMessage(role="assistant", content="".join(texts))
        message.tool_calls.extend(calls)
        return [message]
    if texts or not out:
        out.append(pb.ChatMessage(role="user", content="".join(texts)))
    return out


def _call(block: dict[str, Any], here: str) -> pb.ToolCall:
    arguments = block.get("input")
    return pb.ToolCall(
        id=fields.string(block, "id", here, required=True),
        name=fields.string(block, "name", here, required=True),
        arguments=fields.schema_text(arguments, f"{here}.input"),  # an object, as JSON text
    )


def _result(block: dict[str, Any], here: str, call_ids: set[str]) -> pb.ChatMessage:
    call_id = fields.string(block, "tool_use_id", here, required=True)
    if call_id not in call_ids:
        raise BadRequest(
            f"'{here}.tool_use_id' must answer a tool_use block of an earlier assistant turn, "
            f"got {call_id!r}",
            param=f"{here}.tool_use_id",
        )
    content = block.get("content")
    text = "" if content is None else _text(content, f"{here}.content")
    if fields.boolean(block, "is_error", here):
        text = f"Error: {text}"
    return pb.ChatMessage(role="tool", content=text, tool_call_id=call_id)


def _tools(value: Any) -> list[pb.Tool]:
    """Custom tools (``name``, ``description``, ``input_schema``); server tools are a 400."""
    offered: list[pb.Tool] = []
    seen: set[str] = set()
    for i, item in enumerate(fields.items(value, "tools", "tools", fields.MAX_TOOLS)):
        where = f"tools[{i}]"
        given = fields.obj(item, where)
        kind = given.get("type")
        if kind not in (None, "custom"):
            raise BadRequest(
                f"'{where}.type' is {kind!r}: server tools are not served; only custom tools "
                "(name, description, input_schema)",
                param=f"{where}.type",
            )
        if given.get("input_schema") is None:
            raise BadRequest(f"'{where}.input_schema' is required", param=f"{where}.input_schema")
        offered.append(fields.function_tool(given, where, seen, schema_key="input_schema"))
    return offered


_CHOICES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "any": pb.TOOL_CHOICE_MODE_REQUIRED,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "tool": pb.TOOL_CHOICE_MODE_FUNCTION,
}


def _tool_choice(value: Any, names: list[str]) -> tuple[pb.ToolChoice | None, bool | None]:
    """``{"type": "auto" | "any" | "none" | "tool", "name", "disable_parallel_tool_use"}`` as
    the proto's choice and whether calls may be parallel (None: not given)."""
    if value is None:
        return None, None
    given = fields.obj(value, "tool_choice")
    mode = _CHOICES.get(given.get("type"))  # type: ignore[arg-type]
    if mode is None:
        raise BadRequest(
            "'tool_choice.type' must be 'auto', 'any', 'tool' or 'none', "
            f"got {given.get('type')!r}",
            param="tool_choice.type",
        )
    disable = fields.boolean(given, "disable_parallel_tool_use", "tool_choice")
    choice = pb.ToolChoice(mode=mode)
    if mode in (pb.TOOL_CHOICE_MODE_REQUIRED, pb.TOOL_CHOICE_MODE_FUNCTION) and not names:
        raise BadRequest(
            f"'tool_choice' is {given['type']!r} but no 'tools' are given", "tool_choice"
        )
    if mode == pb.TOOL_CHOICE_MODE_FUNCTION:
        choice.function = fields.string(given, "name", "tool_choice", required=True)
        if choice.function not in names:
            raise BadRequest(
                f"'tool_choice.name' names the tool {choice.function!r}, which is not among "
                "'tools'",
                param="tool_choice.name",
            )
    return choice, None if disable is None else not disable


def _output(body: dict[str, Any]) -> tuple[pb.OutputConstraint | None, str]:
    """``output_config.format`` (or the older beta ``output_format``): a JSON schema the
    answer follows; ``output_config.effort`` is accepted without effect."""
    config = body.get("output_config")
    given, key = None, "output_config.format"
    if config is not None:
        config = fields.obj(config, "output_config")
        effort = config.get("effort")
        if effort is not None and not isinstance(effort, str):
            raise BadRequest("'output_config.effort' must be a string", "output_config.effort")
        given = config.get("format")
    if given is None and body.get("output_format") is not None:
        given, key = body["output_format"], "output_format"
    if given is None:
        return None, key
    kind = fields.obj(given, key).get("type")
    if kind != "json_schema":
        raise BadRequest(f"'{key}.type' must be 'json_schema', got {kind!r}", param=f"{key}.type")
    schema = fields.schema_text(given.get("schema"), f"{key}.schema")
    return pb.OutputConstraint(json_schema=schema), key


# ---- answering ----


def _sse(event: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps({"type": event, **data}, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n".encode()


def tool_use_id(call_id: str) -> str:
    """The neuron's call id (``call_…``) in Anthropic's style (``toolu_…``)."""
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as its ``input``; {} when they do not parse (max_tokens cut them)."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


class Message:
    """How ``/v1/messages`` answers: Anthropic's message, or its events (the relay's
    ``Dialect``).

    Streamed, nothing opens the stream but ``message_start`` with the first message (whose
    usage holds the prompt's tokens), so pings may come before it. The open content block is
    tracked across writes: text opens a text block, a call's first piece a tool_use block
    (closing the one before), and the end closes the last.
    """

    keepalive = PING

    def __init__(self, parsed: Parsed) -> None:
        self.parsed = parsed
        self.model, self.generate, self.stream = parsed.model, parsed.generate, parsed.stream
        self.param = parsed.param
        self.id = f"msg_{uuid.uuid4().hex}"
        self._block = -1  # the open block's index, -1 before the first
        self._open: str | None = None  # its type, None when none is open
        self._around_text = (b"", b"")  # the open text block's delta event around its text

    def _message(self, content: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }

    @staticmethod
    def _usage(prompt: int, cached: int, output: int) -> dict[str, int]:
        # Anthropic's input_tokens leaves out what the cache read: the three add up to the prompt.
        return {
            "input_tokens": prompt - cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": output,
        }

    @staticmethod
    def _stop(outcome: Outcome) -> tuple[str, str | None]:
        if outcome.finish_reason == "stop" and outcome.stop_sequence:
            return "stop_sequence", outcome.stop_sequence
        return _STOP.get(outcome.finish_reason, "end_turn"), None

    def whole(self, outcome: Outcome) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if outcome.text:
            content.append({"type": "text", "text": outcome.text})
        calls: dict[int, dict[str, Any]] = {}
        for piece in outcome.tool_calls:
            call = calls.get(piece.index)
            if call is None:
                call = calls[piece.index] = {"id": tool_use_id(piece.id), "name": piece.name}
                call["arguments"] = ""
            call["arguments"] += piece.arguments
        for call in calls.values():
            content.append(
                {"type": "tool_use", "id": call["id"], "name": call["name"],
                 "input": _input(call["arguments"])}
            )  # fmt: skip
        usage = self._usage(outcome.prompt_tokens, outcome.cached_tokens, outcome.completion_tokens)
        body = self._message(content, usage)
        body["stop_reason"], body["stop_sequence"] = self._stop(outcome)
        return body

    def opening(self) -> bytes:
        return b""  # message_start waits for the first message's usage

    def delta(self, text: str, messages: list[pb.GenerateResponse], first: bool) -> bytes:
        out = []
        if first:
            usage = messages[0].usage
            usage_now = self._usage(usage.prompt_tokens, usage.cached_prompt_tokens, 0)
            out.append(_sse("message_start", {"message": self._message([], usage_now)}))
        if not any(message.tool_calls for message in messages):  # text alone: one event
            if text:
                out.append(self._text(text))
            return b"".join(out)
        for message in messages:
            if message.text:
                out.append(self._text(message.text))
            for piece in message.tool_calls:
                if piece.id:  # a call's first piece opens its block
                    block = {"type": "tool_use", "id": tool_use_id(piece.id), "name": piece.name,
                             "input": {}}  # fmt: skip
                    out.append(self._start(block))
                if piece.arguments:
                    delta = {"type": "input_json_delta", "partial_json": piece.arguments}
                    out.append(_sse("content_block_delta", {"index": self._block, "delta": delta}))
        return b"".join(out)

    def _text(self, text: str) -> bytes:
        """A text_delta event (opening a text block first if none is open): only the text is
        encoded each time, as the OpenAI surface's per-write chunk."""
        out = b""
        if self._open != "text":
            out = self._start({"type": "text", "text": ""})
            head, _, tail = _sse(
                "content_block_delta",
                {"index": self._block, "delta": {"type": "text_delta", "text": "\0"}},
            ).partition(json.dumps("\0").encode())
            self._around_text = head, tail
        head, tail = self._around_text
        return out + head + json.dumps(text).encode() + tail

    def _start(self, block: dict[str, Any]) -> bytes:
        out = self._stop_block()
        self._block += 1
        self._open = block["type"]
        return out + _sse("content_block_start", {"index": self._block, "content_block": block})

    def _stop_block(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return _sse("content_block_stop", {"index": self._block})

    def ending(self, outcome: Outcome) -> bytes:
        stop_reason, stop_sequence = self._stop(outcome)
        usage = self._usage(outcome.prompt_tokens, outcome.cached_tokens, outcome.completion_tokens)
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        end = _sse("message_delta", {"delta": delta, "usage": usage})
        return self._stop_block() + end + _sse("message_stop", {})

    def failure(self, error: CortexError) -> bytes:
        body = anthropic_error_body(error)
        return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


# ---- handlers ----


async def messages(request: web.Request) -> web.StreamResponse:
    gateway = gateway_of(request)
    parsed = checked(parse_messages, gateway, await read_body(request))
    return await relay(request, gateway, Message(parsed))


async def count_tokens(request: web.Request) -> web.Response:
    gateway = gateway_of(request)
    parsed = checked(parse_count, gateway, await read_body(request))
    request["model_label"] = parsed.model
    tokens = await gateway.router.count_tokens(parsed.model, parsed.generate, parsed.param)
    return web.json_response({"input_tokens": tokens})
