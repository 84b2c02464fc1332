"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

The handler parses the body (a wrong or unserved field is a 400 naming it) into a chat for the
neuron: ``instructions`` as the system message, then the conversation of the response named by
``previous_response_id`` (its input and output), then ``input`` (a string, or items:
messages, ``function_call`` and ``function_call_output``). ``Reply`` says how the answer looks
(a ``response`` object whole, or the Responses event sequence with a rising
``sequence_number``) and hands it to ``cortex.api.relay``, which opens the generation, waits
with keep-alives and writes. A finished response is kept (``store``, default true) in the
bounded ``ResponseStore``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from cortex.api import GATEWAY, Gateway, fields, gateway_of
from cortex.api.errors import error_body
from cortex.api.openai import merge_calls
from cortex.api.relay import KEEPALIVE, Outcome, checked, read_body, relay
from cortex.auth import KEY
from cortex.errors import BadRequest, CortexError, ResponseNotFound
from cortex.responsestore import ResponseStore
from helexa.neuron.v1 import neuron_pb2 as pb

STORE = web.AppKey("responses", ResponseStore)
MAX_ITEMS = 2048
MAX_METADATA = 16
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text")
# The neuron names fields after the proto; the first pattern the whole path matches names the
# client's field (messages are "input": instructions and earlier responses come before it).
_PARAMS = [
    (re.compile(p), name)
    for p, name in (
        (r"tools\[(\d+)\]\.(name|description|parameters)", r"tools[\1].\2"),
        (r"output\.json_schema", "text.format.schema"),
        (r"output(\.json_object)?", "text.format"),
        (r"tool_choice(\..*)?", "tool_choice"),
        (r"chat\.messages.*|input", "input"),
        (r"max_tokens", "max_output_tokens"),
    )
]  # fmt: skip
# Fields cortex does not serve: refused by name (when given and not their "off" value).
_UNSUPPORTED = {
    "conversation": "conversations are not served; use previous_response_id",
    "prompt": "stored prompt templates are not served",
    "reasoning": "the models served do not reason",
    "max_tool_calls": "a bound on tool calls is not served",
    "context_management": "context management is not served",
    "moderation": "moderation is not served",
    "image": "image generation is not served",
    "background_options": "background responses are not served",
    "verbosity": "verbosity is not served",
}
# Fields whose value is refused unless it is the one given here (what "off" means).
_ONLY = {
    "background": (False, "background responses are not served"),
    "truncation": ("disabled", "truncation is not served: a conversation beyond the "
                   "model's context is a 400"),
    "top_logprobs": (0, "logprobs are not served on /v1/responses; use /v1/chat/completions"),
}  # fmt: skip


def add_routes(app: web.Application) -> None:
    app[STORE] = ResponseStore(app[GATEWAY].config.responses)
    app.router.add_post("/v1/responses", create)
    app.router.add_get("/v1/responses/{response_id}", retrieve)
    app.router.add_delete("/v1/responses/{response_id}", delete)


# ---- parsing ----


@dataclass
class Parsed:
    """A validated request: the proto to send, and what the response object repeats."""

    model: str
    generate: pb.GenerateRequest
    stream: bool
    store: bool
    # The messages of the conversation, without the instructions: what a later request
    # continues (the answer's output is added to them).
    conversation: list[pb.ChatMessage]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    parallel_tool_calls: bool = True
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = "auto"
    text_format: dict[str, Any] = field(default_factory=lambda: {"type": "text"})
    metadata: dict[str, str] = field(default_factory=dict)
    user: str | None = None


def parse(
    gateway: Gateway, store: ResponseStore, body: dict[str, Any], owner: bytes = b""
) -> Parsed:
    name = fields.model(body)
    _refuse(body)
    previous = body.get("previous_response_id")
    conversation: list[pb.ChatMessage] = []
    if previous is not None:
        if not isinstance(previous, str) or not previous:
            raise BadRequest(
                "'previous_response_id' must be a response's id", param="previous_response_id"
            )
        kept = store.get(previous, owner)
        if kept is None:
            raise ResponseNotFound(
                f"Previous response with id '{previous}' not found (never stored, deleted, "
                "or older than cortex keeps responses)",
                param="previous_response_id",
            )
        conversation.extend(kept.conversation)
    conversation.extend(_input(body.get("input"), conversation))
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequest("'instructions' must be a string", param="instructions")
    chat = pb.ChatMessages()
    if instructions:
        chat.messages.append(pb.ChatMessage(role="system", content=instructions))
    chat.messages.extend(conversation)
    request = pb.GenerateRequest(chat=chat)

    tools = fields.flat_tools(body.get("tools"))
    choice = fields.flat_tool_choice(body.get("tool_choice"), [t.name for t in tools])
    parallel = fields.boolean(body, "parallel_tool_calls")
    text = body.get("text")
    given_format = None
    if text is not None:
        if fields.obj(text, "text").get("verbosity") is not None:
            raise BadRequest("'text.verbosity' is not supported", param="text.verbosity")
        given_format = text.get("format")
    output = fields.text_format(given_format)
    fields.constrain(request, tools, choice, parallel, output, "text.format")

    limit = gateway.config.limits.max_tokens
    request.max_tokens_limit = limit  # also bounds a request that leaves it out
    max_output_tokens = fields.max_tokens(body, "max_output_tokens", limit)
    if max_output_tokens is not None:
        request.max_tokens = max_output_tokens
    fields.sampling(body, request)
    stream = bool(fields.boolean(body, "stream"))
    if not stream:
        # The answer whole: the neuron sends it in one message, as for chat completions.
        request.message_interval = gateway.config.timeouts.stall / 2
    keep = fields.boolean(body, "store")
    model_id = gateway.router.resolve(name)
    request.model = model_id
    return Parsed(
        model=model_id,
        generate=request,
        stream=stream,
        store=True if keep is None else keep,
        conversation=conversation,
        instructions=instructions,
        previous_response_id=previous,
        max_output_tokens=max_output_tokens,
        # As given (the proto's float32 would echo 0.7 as 0.699999988).
        temperature=1.0 if body.get("temperature") is None else float(body["temperature"]),
        top_p=1.0 if body.get("top_p") is None else float(body["top_p"]),
        parallel_tool_calls=True if parallel is None else parallel,
        tools=[_tool_object(t) for t in tools],
        tool_choice="auto" if body.get("tool_choice") is None else body["tool_choice"],
        text_format={"type": "text"} if given_format is None else given_format,
        metadata=_metadata(body.get("metadata")),
        user=fields.string(body, "user") or None,
    )


def _refuse(body: dict[str, Any]) -> None:
    fields.refuse(body, _UNSUPPORTED)
    for key, (off, why) in _ONLY.items():
        value = body.get(key)
        if value is not None and value != off:
            raise BadRequest(f"'{key}' is not supported: {why}", param=key)
    include = body.get("include")
    if include:  # nothing more than the answer can be included
        raise BadRequest(
            f"'include' is not supported: nothing beyond the answer is served, got {include!r}",
            param="include",
        )


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    given = fields.obj(value, "metadata")
    if len(given) > MAX_METADATA or not all(
        isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
        for k, v in given.items()
    ):
        raise BadRequest(
            f"'metadata' takes at most {MAX_METADATA} string keys (64 characters) and values (512)",
            param="metadata",
        )
    return given


def _tool_object(tool: pb.Tool) -> dict[str, Any]:
    """A function tool as the response object lists it."""
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description or None,
        "parameters": json.loads(tool.parameters) if tool.parameters else None,
        "strict": True,  # the neuron holds every call to its schema
    }


def _input(value: Any, before: list[pb.ChatMessage]) -> list[pb.ChatMessage]:
    """``input``: a string (one user message) or items. A ``function_call`` joins the
    assistant message before it (or opens one); a ``function_call_output`` answers a call of
    ``before`` or of the items before it."""
    if isinstance(value, str):
        if not value:
            raise BadRequest("'input' must be a non-empty string or list of items", param="input")
        return [pb.ChatMessage(role="user", content=value)]
    if not isinstance(value, list) or not value:
        raise BadRequest("'input' must be a non-empty string or list of items", param="input")
    if len(value) > MAX_ITEMS:
        raise BadRequest(f"'input' takes at most {MAX_ITEMS} items", param="input")
    call_ids = {call.id for message in before for call in message.tool_calls}
    out: list[pb.ChatMessage] = []
    for i, item in enumerate(value):
        key = f"input[{i}]"
        given = fields.obj(item, key)
        kind = given.get("type", "message")
        if kind == "message":
            out.append(_message(given, key))
        elif kind == "function_call":
            call = pb.ToolCall(
                id=fields.string(given, "call_id", key, required=True),
                name=fields.string(given, "name", key, required=True),
                arguments=fields.arguments(given, "arguments", key),
            )
            if not out or out[-1].role != "assistant":
                out.append(pb.ChatMessage(role="assistant"))
            out[-1].tool_calls.append(call)
            call_ids.add(call.id)
        elif kind == "function_call_output":
            call_id = fields.string(given, "call_id", key, required=True)
            if call_id not in call_ids:
                raise BadRequest(
                    f"'{key}.call_id' must answer an earlier function_call, got {call_id!r}",
                    param=f"{key}.call_id",
                )
            output = _content(given.get("output"), f"{key}.output")
            out.append(pb.ChatMessage(role="tool", content=output, tool_call_id=call_id))
        else:
            raise BadRequest(
                f"'{key}.type': {kind!r} items are not served; only 'message', "
                "'function_call' and 'function_call_output'",
                param=f"{key}.type",
            )
    return out


def _message(item: dict[str, Any], key: str) -> pb.ChatMessage:
    given = item.get("role")
    role = _ROLES.get(given) if isinstance(given, str) else None
    if role is None:
        raise BadRequest(
            f"'{key}.role' must be one of {', '.join(_ROLES)}, got {given!r}", param=f"{key}.role"
        )
    return pb.ChatMessage(role=role, content=_content(item.get("content"), f"{key}.content"))


def _content(value: Any, key: str) -> str:
    """A string, or text parts (``input_text``, ``output_text``) joined; images, files and
    audio are refused."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRequest(f"'{key}' must be a string or a list of text parts", param=key)
    texts = []
    for j, part in enumerate(value):
        where = f"{key}[{j}]"
        kind = fields.obj(part, where).get("type")
        if kind not in _TEXT_PARTS:
            raise BadRequest(
                f"'{where}.type': {kind!r} content is not served; only text "
                "('input_text', 'output_text')",
                param=f"{where}.type",
            )
        texts.append(fields.string(part, "text", where, required=False))
    return "".join(texts)


# ---- answering ----


def _usage(outcome: Outcome) -> dict[str, Any]:
    return {
        "input_tokens": outcome.prompt_tokens,
        # The neuron's prefix cache keeps every prompt: what it did not hold, it now does.
        "input_tokens_details": {
            "cached_tokens": outcome.cached_tokens,
            "cache_write_tokens": outcome.prompt_tokens - outcome.cached_tokens,
        },
        "output_tokens": outcome.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def _event(body: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (
        body["type"].encode(),
        json.dumps(body, separators=(",", ":")).encode(),
    )


class Reply:
    """How a response looks, whole and as the Responses event sequence: the relay's
    ``Dialect`` for ``/v1/responses``. A finished response is kept when asked to be."""

    keepalive = KEEPALIVE

    def __init__(self, parsed: Parsed, store: ResponseStore, owner: bytes = b"") -> None:
        self.parsed = parsed
        self.store = store
        self.owner = owner
        self.id = f"resp_{uuid.uuid4().hex}"
        self.model = parsed.model
        self.generate = parsed.generate
        self.stream = parsed.stream
        self.created = int(time.time())
        self.rich = bool(parsed.generate.tools)  # messages may carry calls
        self._sequence = 0
        self._items: list[dict[str, Any]] = []  # the output items so far
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._texts: list[str] = []  # the open message's text so far
        self._around_text: tuple[bytes, bytes, bytes] = (b"", b"", b"")

    def param(self, field: str) -> str:
        for pattern, name in _PARAMS:
            match = pattern.fullmatch(field)
            if match is not None:
                return match.expand(name)
        return field

    # ---- the response object ----

    def response(self, status: str, output: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
        parsed = self.parsed
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": parsed.instructions,
            "max_output_tokens": parsed.max_output_tokens,
            "metadata": parsed.metadata,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": parsed.parallel_tool_calls,
            "previous_response_id": parsed.previous_response_id,
            "store": parsed.store,
            "temperature": parsed.temperature,
            "text": {"format": parsed.text_format},
            "tool_choice": parsed.tool_choice,
            "tools": parsed.tools,
            "top_p": parsed.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": parsed.user,
            **more,
        }

    def _finished(self, outcome: Outcome, output: list[dict[str, Any]]) -> dict[str, Any]:
        """The response once the generation ended: completed, or incomplete when cut by
        ``max_output_tokens`` (or the context); kept when ``store``."""
        cut = outcome.finish_reason == "length"
        body = self.response(
            "incomplete" if cut else "completed",
            output,
            usage=_usage(outcome),
            incomplete_details={"reason": "max_output_tokens"} if cut else None,
            completed_at=None if cut else int(time.time()),
        )
        if self.parsed.store:
            self._keep(body)
        return body

    def _keep(self, body: dict[str, Any]) -> None:
        """Keep the response and the conversation it ends (its output as an assistant
        message, as ``function_call`` input items would give it)."""
        answer = pb.ChatMessage(role="assistant")
        for item in body["output"]:
            if item["type"] == "message":
                answer.content += "".join(part["text"] for part in item["content"])
            else:
                answer.tool_calls.append(
                    pb.ToolCall(id=item["call_id"], name=item["name"], arguments=item["arguments"])
                )
        conversation = [*self.parsed.conversation, answer]
        size = len(json.dumps(body, separators=(",", ":")))
        self.store.put(self.id, body, conversation, size, self.owner)

    def _message_item(self, text: str, status: str) -> dict[str, Any]:
        return {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [_text_part(text)] if status != "in_progress" else [],
        }

    def _call_item(self, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        return {
            "id": f"fc_{uuid.uuid4().hex}",
            "type": "function_call",
            "status": status,
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
        }

    def whole(self, outcome: Outcome) -> dict[str, Any]:
        status = "incomplete" if outcome.finish_reason == "length" else "completed"
        calls = merge_calls(outcome.tool_calls)
        output = []
        if outcome.text or not calls:
            output.append(self._message_item(outcome.text, status))
        for call in calls:
            function = call["function"]
            output.append(
                self._call_item(call["id"], function["name"], function["arguments"], status)
            )
        return self._finished(outcome, output)

    # ---- the event sequence ----

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    def _emit(self, type_: str, **body: Any) -> bytes:
        return _event({"type": type_, **body, "sequence_number": self._next()})

    def opening(self) -> bytes:
        begun = self.response("in_progress", [])
        return self._emit("response.created", response=begun) + self._emit(
            "response.in_progress", response=begun
        )

    def delta(self, text: str, messages: list[pb.GenerateResponse], first: bool) -> bytes:
        if not self.rich:
            return self._text(text) if text else b""
        out = []
        for message in messages:
            if message.text:
                out.append(self._text(message.text))
            for piece in message.tool_calls:
                out.append(self._call(piece))
        return b"".join(out)

    def _text(self, text: str) -> bytes:
        """A ``response.output_text.delta`` (the message opened first when none is open).
        Only the text and the sequence number are encoded per write."""
        out = b""
        if self._open is None or self._open["type"] != "message":
            out = self._close("completed") + self._open_message()
        self._texts.append(text)
        head, middle, tail = self._around_text
        return out + head + json.dumps(text).encode() + middle + b"%d" % self._next() + tail

    def _open_message(self) -> bytes:
        item = self._open = self._message_item("", "in_progress")
        index = len(self._items)
        self._texts = []
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        sample = _event({"type": "response.output_text.delta", **where, "delta": "\0",
                         "logprobs": [], "sequence_number": 0})  # fmt: skip
        head, _, rest = sample.partition(json.dumps("\0").encode())
        middle, _, tail = rest.rpartition(b"0")
        self._around_text = head, middle, tail
        return self._emit("response.output_item.added", output_index=index, item=item) + (
            self._emit("response.content_part.added", **where, part=_text_part(""))
        )

    def _call(self, piece: pb.ToolCallDelta) -> bytes:
        out = b""
        if piece.id:  # a call opens: the item before it is done
            out = self._close("completed")
            self._open = self._call_item(piece.id, piece.name, "", "in_progress")
            out += self._emit("response.output_item.added", output_index=len(self._items),
                              item=self._open)  # fmt: skip
        item = self._open
        if item is None or item["type"] != "function_call" or not piece.arguments:
            return out
        item["arguments"] += piece.arguments
        return out + self._emit(
            "response.function_call_arguments.delta",
            item_id=item["id"],
            output_index=len(self._items),
            delta=piece.arguments,
        )

    def _close(self, status: str) -> bytes:
        """End the open item (if any) with ``status``: its done events."""
        item = self._open
        if item is None:
            return b""
        self._open = None
        index = len(self._items)
        item["status"] = status
        out = b""
        if item["type"] == "message":
            text = "".join(self._texts)
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out += self._emit("response.output_text.done", **where, text=text, logprobs=[])
            out += self._emit("response.content_part.done", **where, part=_text_part(text))
            item["content"] = [_text_part(text)]
        else:
            out += self._emit(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
        self._items.append(item)
        return out + self._emit("response.output_item.done", output_index=index, item=item)

    def ending(self, outcome: Outcome) -> bytes:
        status = "incomplete" if outcome.finish_reason == "length" else "completed"
        out = b""
        if self._open is None and not self._items:  # an empty answer is an empty message
            out = self._open_message()
        out += self._close(status)
        body = self._finished(outcome, self._items)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + self._emit(kind, response=body)

    def failure(self, error: CortexError) -> bytes:
        envelope = error_body(error)["error"]
        failed = self.response(
            "failed", self._items, error={"code": "server_error", "message": error.message}
        )
        return self._emit(
            "error", code=envelope["code"], message=error.message, param=envelope["param"]
        ) + self._emit("response.failed", response=failed)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


# ---- handlers ----


async def create(request: web.Request) -> web.StreamResponse:
    gateway = gateway_of(request)
    store = request.app[STORE]
    owner = request.get(KEY, b"")
    parsed = checked(parse, gateway, store, await read_body(request), owner)
    return await relay(request, gateway, Reply(parsed, store, owner))


def _kept(request: web.Request) -> tuple[str, dict[str, Any]]:
    response_id = request.match_info["response_id"]
    kept = request.app[STORE].get(response_id, request.get(KEY, b""))
    if kept is None:
        raise ResponseNotFound(f"Response with id '{response_id}' not found.")
    request["model_label"] = kept.response["model"]
    return response_id, kept.response


async def retrieve(request: web.Request) -> web.Response:
    _, body = _kept(request)
    return web.json_response(body)


async def delete(request: web.Request) -> web.Response:
    response_id, _ = _kept(request)
    request.app[STORE].delete(response_id, request.get(KEY, b""))
    return web.json_response({"id": response_id, "object": "response", "deleted": True})
