"""cortex's Anthropic Messages surface: ``/v1/messages`` (whole and streamed) and
``/v1/messages/count_tokens``, Anthropic's errors, keys in ``x-api-key``.

The first tests parse requests and shape answers without processes (answers are checked
against the anthropic SDK's own types). The rest run the real SmolLM2 behind a real neuron and
cortex and talk to them with the anthropic SDK (``max_retries=0``) or raw HTTP, reading the
event stream as it is sent.
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import jsonschema
import pytest
from anthropic.types import Message as SDKMessage
from pydantic import BaseModel

from cortex.api.anthropic import Message, parse_count, parse_messages
from cortex.api.relay import Outcome
from cortex.errors import BadRequest
from helexa.neuron.v1 import neuron_pb2 as pb
from tests.harness import (
    DEMO_GGUF,
    DEMO_ID,
    CortexProcess,
    NeuronProcess,
    catalogue_model,
    cortex_config,
    leave_stream_and_see_it_cancelled,
    stub_gateway,
)

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city's name"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
TIME = {
    "name": "get_time",
    "description": "The current time in a time zone",
    "input_schema": {
        "type": "object",
        "properties": {"zone": {"type": "string"}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": DEMO_ID, "max_tokens": 16, "messages": QUESTION, **extra}


# ---- parsing, without processes ----


def test_system_blocks_tool_use_and_results_become_the_proto() -> None:
    body = _body(
        system=[{"type": "text", "text": "Be brief. ", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Use tools."}],
        messages=[
            *ASK_WEATHER,
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": "22 C"}]},
                {"type": "text", "text": "And tomorrow?"},
            ]},
        ],
        tools=[WEATHER, {**TIME, "type": "custom"}],
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
        stop_sequences=["\n\n"], temperature=0.5, top_p=0.9, top_k=40,
        metadata={"user_id": "u-1"}, thinking={"type": "disabled"}, service_tier="auto",
        output_config={"effort": "high"}, cache_control={"type": "ephemeral"},
    )  # fmt: skip
    parsed = parse_messages(stub_gateway(), body)
    request = parsed.generate
    roles = [(m.role, m.content) for m in request.chat.messages]
    assert roles == [
        ("system", "Be brief. Use tools."),
        ("user", ASK_WEATHER[0]["content"]),
        ("assistant", "Let me look."),
        ("tool", "22 C"),
        ("user", "And tomorrow?"),
    ]
    assert parsed.origins == ("system", "messages[0]", "messages[1]", "messages[2]", "messages[2]")
    call = request.chat.messages[2].tool_calls[0]
    assert (call.id, call.name, json.loads(call.arguments)) == (
        "toolu_1", "get_weather", {"city": "Paris"}
    )  # fmt: skip
    assert request.chat.messages[3].tool_call_id == "toolu_1"
    assert [t.name for t in request.tools] == ["get_weather", "get_time"]
    assert json.loads(request.tools[0].parameters) == WEATHER["input_schema"]
    assert request.tool_choice == pb.ToolChoice(
        mode=pb.TOOL_CHOICE_MODE_FUNCTION, function="get_time"
    )
    assert request.HasField("parallel_tool_calls") and not request.parallel_tool_calls
    assert list(request.stop) == ["\n\n"] and request.max_tokens == 16
    assert (request.temperature, request.top_k) == (0.5, 40)
    assert abs(request.top_p - 0.9) < 1e-6
    assert not parsed.stream and request.message_interval > 0


@pytest.mark.parametrize(
    ("choice", "mode"),
    [("auto", pb.TOOL_CHOICE_MODE_AUTO), ("any", pb.TOOL_CHOICE_MODE_REQUIRED),
     ("none", pb.TOOL_CHOICE_MODE_NONE)],
)  # fmt: skip
def test_tool_choice_types(choice: str, mode: int) -> None:
    request = parse_messages(stub_gateway(), _body(tools=[WEATHER], tool_choice={"type": choice}))
    assert request.generate.tool_choice.mode == mode


def test_output_config_format_is_the_json_schema_constraint() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for body in (
        _body(output_config={"format": {"type": "json_schema", "schema": schema}}),
        _body(output_format={"type": "json_schema", "schema": schema}),  # the older beta field
    ):
        assert (
            json.loads(parse_messages(stub_gateway(), body).generate.output.json_schema) == schema
        )
    counted = parse_count(stub_gateway(), {"model": DEMO_ID, "messages": QUESTION, "stream": True})
    assert not counted.generate.HasField("max_tokens") and not counted.stream


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
BAD_FIELDS = [
    ("no-max-tokens", {"max_tokens": None}, "max_tokens"),
    ("max-tokens-0", {"max_tokens": 0}, "max_tokens"),
    ("max-tokens-above-limit", {"max_tokens": 5000}, "max_tokens"),
    ("no-messages", {"messages": []}, "messages"),
    ("role-system", {"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ("image", {"messages": [{"role": "user", "content": [IMAGE]}]}, "messages[0].content[0]"),
    ("document", {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0]"),
    ("image-in-result", {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [IMAGE]}]}]}, "messages[1].content[0].content[0]"),
    ("result-answers-nothing", {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t9", "content": "x"}]}]}, "messages[0].content[0].tool_use_id"),
    ("tool-use-by-user", {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, "messages[0].content[0]"),
    ("tool-use-input-list", {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": [1]}]}, *QUESTION]}, "messages[0].content[0].input"),
    ("prefill", {"messages": [*QUESTION, {"role": "assistant", "content": "The"}]}, "messages[1]"),
    ("system-number", {"system": 5}, "system"),
    ("server-tool", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ("tool-no-schema", {"tools": [{"name": "f"}]}, "tools[0].input_schema"),
    ("tool-name-space", {"tools": [{"name": "get weather", "input_schema": {"type": "object"}}]}, "tools[0].name"),
    ("tool-twice", {"tools": [WEATHER, WEATHER]}, "tools[1].name"),
    ("choice-unknown", {"tools": [WEATHER], "tool_choice": {"type": "required"}}, "tool_choice.type"),
    ("choice-unlisted", {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_time"}}, "tool_choice.name"),
    ("choice-any-no-tools", {"tool_choice": {"type": "any"}}, "tool_choice"),
    ("format-with-auto-tools", {"tools": [WEATHER], "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "output_config.format"),
    ("format-type", {"output_config": {"format": {"type": "json_object"}}}, "output_config.format.type"),
    ("format-no-schema", {"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
    ("temperature-2", {"temperature": 2}, "temperature"),
    ("top-k-negative", {"top_k": -1}, "top_k"),
    ("stop-empty", {"stop_sequences": [""]}, "stop_sequences"),
    ("stop-too-many", {"stop_sequences": [str(i) for i in range(17)]}, "stop_sequences"),
    ("metadata-user-number", {"metadata": {"user_id": 5}}, "metadata.user_id"),
    ("thinking-type", {"thinking": {"type": "deep"}}, "thinking.type"),
    ("container", {"container": "c-1"}, "container"),
    ("mcp", {"mcp_servers": [{"type": "url", "url": "http://x"}]}, "mcp_servers"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param"), [pytest.param(*c[1:], id=c[0]) for c in BAD_FIELDS])
def test_bad_field_is_refused_naming_it(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as error:
        parse_messages(stub_gateway(), _body(**extra))
    assert error.value.param == param, error.value.message
    assert error.value.message


def test_the_neurons_400s_name_anthropics_fields() -> None:
    # system, a question, a call, then a result and a question: five proto messages of four
    # fields.
    messages = [
        *ASK_WEATHER,
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "22 C"},
            {"type": "text", "text": "And tomorrow?"}]},
    ]  # fmt: skip
    parsed = parse_messages(stub_gateway(), _body(system="Be brief.", messages=messages))
    cases = {
        "chat.messages[4].content": "messages[2]",
        "chat.messages[2].tool_calls[0].arguments": "messages[1]",
        "chat.messages[0]": "system",
        "chat.messages": "messages",
        "tools[1].parameters": "tools[1].input_schema",
        "tools[0].name": "tools[0].name",
        "output.json_schema": "output_config.format.schema",
        "tool_choice.function": "tool_choice",
        "max_tokens": "max_tokens",
    }
    for proto_name, ours in cases.items():
        assert parsed.param(proto_name) == ours, proto_name
    assert Message(parsed).param("tools[1].parameters") == "tools[1].input_schema"
    beta = parse_messages(
        stub_gateway(), _body(output_format={"type": "json_schema", "schema": {"type": "object"}})
    )
    assert beta.param("output.json_schema") == "output_format.schema"
    assert parsed.generate.max_tokens_limit == 4096


def _message(stream: bool = False) -> Message:
    return Message(parse_messages(stub_gateway(), _body(tools=[WEATHER], stream=stream)))


CALL_PIECES = [
    pb.ToolCallDelta(index=0, id="call_ab", name="get_weather", arguments=""),
    pb.ToolCallDelta(index=0, arguments='{"city": '),
    pb.ToolCallDelta(index=0, arguments='"Paris"}'),
]


def test_whole_answer_is_anthropics_message() -> None:
    outcome = Outcome(
        text="Let me check.", finish_reason="tool_calls", prompt_tokens=50, cached_tokens=30,
        completion_tokens=12, tool_calls=CALL_PIECES,
    )  # fmt: skip
    body = _message().whole(outcome)
    message = SDKMessage.model_validate(body)
    assert message.id.startswith("msg_") and message.stop_reason == "tool_use"
    assert message.content[0].type == "text" and message.content[0].text == "Let me check."
    call = message.content[1]
    assert call.type == "tool_use" and call.id == "toolu_ab" and call.input == {"city": "Paris"}
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (20, 30)
    assert message.usage.output_tokens == 12
    stopped = _message().whole(Outcome(text="1, 2", finish_reason="stop", stop_sequence=", 3"))
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", ", 3")
    cut = _message().whole(Outcome(finish_reason="length", tool_calls=CALL_PIECES[:2]))
    assert cut["stop_reason"] == "max_tokens" and cut["content"][0]["input"] == {}


def _events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each SSE event; its ``event:`` line must name its data's type."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name, block
        events.append((name, data))
    return events


def test_streamed_text_then_call_is_anthropics_event_sequence() -> None:
    reply = _message(stream=True)
    first = pb.GenerateResponse(text="Let", usage=pb.Usage(prompt_tokens=9, cached_prompt_tokens=4))
    raw = reply.delta("Let", [first], first=True)
    raw += reply.delta(" me", [pb.GenerateResponse(text=" me")], first=False)
    calls = [
        pb.GenerateResponse(tool_calls=CALL_PIECES[:2]),
        pb.GenerateResponse(tool_calls=CALL_PIECES[2:]),
    ]
    raw += reply.delta("", calls, first=False)
    raw += reply.ending(
        Outcome(finish_reason="tool_calls", prompt_tokens=9, cached_tokens=4, completion_tokens=7)
    )
    events = _events(raw)
    assert [e for e, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 5 and start["usage"]["cache_read_input_tokens"] == 4
    assert events[1][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}  # fmt: skip
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "Let"}
    tool = events[5][1]
    assert tool["index"] == 1 and tool["content_block"] == {
        "type": "tool_use", "id": "toolu_ab", "name": "get_weather", "input": {}
    }  # fmt: skip
    json_text = "".join(
        d["delta"]["partial_json"]
        for e, d in events
        if e == "content_block_delta" and d["index"] == 1
    )
    assert json.loads(json_text) == {"city": "Paris"}
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] == 7
    error = _events(reply.failure(BadRequest("messages[0]: no", param="messages[0]")))
    assert error == [
        (
            "error",
            {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": "messages[0]: no"},
            },
        )
    ]


def test_answers_and_errors_match_the_served_openapi_description() -> None:
    from cortex.api.errors import anthropic_error_body
    from cortex.api.openapi import DOCUMENT
    from cortex.errors import NoCapacity

    def schema(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}", "components": DOCUMENT["components"]}

    outcome = Outcome(text="Hi", finish_reason="tool_calls", tool_calls=CALL_PIECES)
    jsonschema.validate(_message().whole(outcome), schema("Message"))
    jsonschema.validate(anthropic_error_body(NoCapacity("busy")), schema("AnthropicError"))
    request = _body(
        system=[{"type": "text", "text": "x"}], tools=[WEATHER], tool_choice={"type": "any"},
        messages=[*ASK_WEATHER, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}],
        stop_sequences=["x"], top_k=5, metadata={"user_id": "u"}, thinking={"type": "disabled"},
    )  # fmt: skip
    parse_messages(stub_gateway(), request)
    jsonschema.validate(request, schema("MessagesRequest"))


def test_anthropic_error_messages_are_cut_as_openais() -> None:
    from cortex.api.errors import MESSAGE_CHARS, anthropic_error_body, error_body

    long = BadRequest("x" * 5000)
    message = anthropic_error_body(long)["error"]["message"]
    assert message == error_body(long)["error"]["message"]
    assert message.startswith("x" * MESSAGE_CHARS) and message.endswith("(4000 more)")


# ---- end to end: the real model behind a real neuron and cortex ----


@pytest.fixture
def cortex(shared_cortex: CortexProcess) -> CortexProcess:
    return shared_cortex


def client(cortex: CortexProcess, key: str = "unused") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=cortex.url, api_key=key, max_retries=0)


async def test_create_whole_answers_paris_as_a_message(cortex: CortexProcess) -> None:
    reply = await client(cortex).messages.create(
        model=DEMO_ID,
        max_tokens=32,
        messages=QUESTION,
        extra_body=GREEDY,  # type: ignore[arg-type]
    )
    assert reply.id.startswith("msg_") and reply.type == "message" and reply.role == "assistant"
    assert reply.content and reply.content[0].type == "text"
    assert "Paris" in reply.content[0].text
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.stop_sequence is None
    assert reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) > 10
    assert 0 < reply.usage.output_tokens <= 32


async def test_stream_gives_the_text_and_the_final_message(cortex: CortexProcess) -> None:
    async with client(cortex).messages.stream(
        model=DEMO_ID,
        max_tokens=32,
        messages=QUESTION,
        extra_body=GREEDY,  # type: ignore[arg-type]
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert "Paris" in text and final.content[0].type == "text" and final.content[0].text == text
    whole = await client(cortex).messages.create(
        model=DEMO_ID,
        max_tokens=32,
        messages=QUESTION,
        extra_body=GREEDY,  # type: ignore[arg-type]
    )
    assert whole.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens > 0


async def test_stop_sequence_ends_the_answer_and_is_named(cortex: CortexProcess) -> None:
    sdk = client(cortex)
    free = await sdk.messages.create(
        model=DEMO_ID,
        max_tokens=32,
        messages=QUESTION,
        extra_body=GREEDY,  # type: ignore[arg-type]
    )
    text = free.content[0].text  # type: ignore[union-attr]
    stop = text.split()[2]  # a word in the middle of the greedy answer
    reply = await sdk.messages.create(
        model=DEMO_ID, max_tokens=32, messages=QUESTION, stop_sequences=[stop],  # type: ignore[arg-type]
        extra_body=GREEDY,
    )  # fmt: skip
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", stop)
    assert stop not in reply.content[0].text and text.startswith(reply.content[0].text)  # type: ignore[union-attr]
    async with sdk.messages.stream(
        model=DEMO_ID, max_tokens=32, messages=QUESTION, stop_sequences=[stop],  # type: ignore[arg-type]
        extra_body=GREEDY,
    ) as stream:  # fmt: skip
        final = await stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


class Capital(BaseModel):
    city: str
    country: str


async def test_parse_with_a_pydantic_model_returns_the_parsed_object(cortex: CortexProcess) -> None:
    reply = await client(cortex).messages.parse(
        model=DEMO_ID, max_tokens=100, output_format=Capital,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        extra_body=GREEDY,
    )  # fmt: skip
    assert isinstance(reply.parsed_output, Capital), reply.content
    assert reply.stop_reason == "end_turn"


async def test_forced_tool_use_is_parsed_into_input_and_validates(cortex: CortexProcess) -> None:
    sdk = client(cortex)
    reply = await sdk.messages.create(
        model=DEMO_ID, max_tokens=64, messages=ASK_WEATHER, tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY,
    )  # fmt: skip
    assert reply.stop_reason == "tool_use"
    calls = [b for b in reply.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id.startswith("toolu_")
    jsonschema.validate(calls[0].input, WEATHER["input_schema"])
    async with sdk.messages.stream(
        model=DEMO_ID, max_tokens=64, messages=ASK_WEATHER, tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body=GREEDY,
    ) as stream:  # fmt: skip
        final = await stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and len(streamed) == 1
    schema = (WEATHER if streamed[0].name == "get_weather" else TIME)["input_schema"]
    jsonschema.validate(streamed[0].input, schema)


async def test_tool_result_round_trip_answers_in_text(cortex: CortexProcess) -> None:
    sdk = client(cortex)
    first = await sdk.messages.create(
        model=DEMO_ID, max_tokens=64, messages=ASK_WEATHER, tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "any"}, extra_body=GREEDY,
    )  # fmt: skip
    calls = [b for b in first.content if b.type == "tool_use"]
    assert calls
    history: list[Any] = [
        *ASK_WEATHER,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": c.id, "content": "22 C and sunny"} for c in calls
        ]},
    ]  # fmt: skip
    final = await sdk.messages.create(
        model=DEMO_ID, max_tokens=48, messages=history, tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "none"}, extra_body=GREEDY,
    )  # fmt: skip
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.content and all(b.type == "text" for b in final.content)


async def test_count_tokens_is_the_prompt_the_answer_reports(cortex: CortexProcess) -> None:
    sdk = client(cortex)
    params: dict[str, Any] = {
        "model": DEMO_ID, "messages": ASK_WEATHER, "system": "Answer briefly.",
        "tools": [WEATHER], "tool_choice": {"type": "any"},
    }  # fmt: skip
    counted = await sdk.messages.count_tokens(**params)
    reply = await sdk.messages.create(**params, max_tokens=8, extra_body=GREEDY)
    usage = reply.usage
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)
    plain = await sdk.messages.count_tokens(model=DEMO_ID, messages=ASK_WEATHER)
    assert plain.input_tokens < counted.input_tokens  # the tools are in the prompt
    with pytest.raises(anthropic.NotFoundError):
        await sdk.messages.count_tokens(model="no-such-model", messages=ASK_WEATHER)


async def test_raw_event_sequence_is_anthropics_in_order(cortex: CortexProcess) -> None:
    async def raw(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        async with aiohttp.ClientSession() as session:
            headers = {"anthropic-version": "2023-06-01", "x-api-key": "unused"}
            async with session.post(cortex.url + "/v1/messages", json=body, headers=headers) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
                return [e for e in _events(await r.read()) if e[0] != "ping"]

    text = await raw(_body(max_tokens=24, stream=True, temperature=0))
    names = [e for e, _ in text]
    assert names[:2] == ["message_start", "content_block_start"]
    assert set(names[2:-3]) == {"content_block_delta"} and len(names) > 5
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    message = text[0][1]["message"]
    assert message["id"].startswith("msg_") and message["content"] == []
    assert message["usage"]["input_tokens"] + message["usage"]["cache_read_input_tokens"] > 10
    assert all(d["delta"]["type"] == "text_delta" and d["index"] == 0 for _, d in text[2:-3])
    end = text[-2][1]
    assert end["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert 0 < end["usage"]["output_tokens"] <= 24

    tool = await raw(
        _body(max_tokens=64, stream=True, temperature=0, messages=ASK_WEATHER, tools=[WEATHER],
              tool_choice={"type": "tool", "name": "get_weather"})
    )  # fmt: skip
    names = [e for e, _ in tool]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    block = tool[1][1]["content_block"]
    assert block["type"] == "tool_use" and block["input"] == {} and block["name"] == "get_weather"
    assert block["id"].startswith("toolu_")
    deltas = [d["delta"] for e, d in tool if e == "content_block_delta"]
    assert deltas and all(d["type"] == "input_json_delta" for d in deltas)
    jsonschema.validate(
        json.loads("".join(d["partial_json"] for d in deltas)), WEATHER["input_schema"]
    )
    assert tool[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_bad_input_is_anthropics_400_and_cortex_keeps_serving(cortex: CortexProcess) -> None:
    sdk = client(cortex)
    with pytest.raises(anthropic.BadRequestError) as error:
        await sdk.messages.create(
            model=DEMO_ID, max_tokens=8,
            messages=[{"role": "user", "content": [IMAGE]}],  # type: ignore[list-item]
        )  # fmt: skip
    assert error.value.body["type"] == "error"  # type: ignore[index]
    assert error.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "messages[0].content[0]" in error.value.body["error"]["message"]  # type: ignore[index]
    # The neuron's refusal (a schema it cannot compile) names the client's field.
    bad_schema = {"type": "object", "properties": {"a": {"type": "no-such-type"}}}
    with pytest.raises(anthropic.BadRequestError) as error:
        await sdk.messages.create(
            model=DEMO_ID, max_tokens=8, messages=QUESTION,
            tools=[{"name": "f", "input_schema": bad_schema}], tool_choice={"type": "any"},  # type: ignore[list-item]
        )  # fmt: skip
    assert error.value.body["error"]["message"].startswith("tools[0].input_schema")  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as missing:
        await sdk.messages.create(model="no-such-model", max_tokens=8, messages=QUESTION)  # type: ignore[arg-type]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    big = [{"role": "user", "content": "x" * (2 << 20)}]
    with pytest.raises(anthropic.RequestTooLargeError) as large:
        await sdk.messages.create(model=DEMO_ID, max_tokens=8, messages=big)  # type: ignore[arg-type]
    assert large.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]
    async with aiohttp.ClientSession() as session:
        async with session.get(cortex.url + "/v1/messages") as r:  # wrong method
            assert r.status == 405
            assert (await r.json())["error"]["type"] == "invalid_request_error"
    reply = await sdk.messages.create(model=DEMO_ID, max_tokens=4, messages=QUESTION)  # type: ignore[arg-type]
    assert reply.content


async def test_client_leaving_a_stream_cancels_the_generation_on_the_neuron(
    cortex: CortexProcess, shared_neuron: NeuronProcess
) -> None:
    story = [{"role": "user", "content": "Write a very long story about a dragon."}]
    body = _body(messages=story, max_tokens=2000, temperature=0.7, stream=True)
    await leave_stream_and_see_it_cancelled(
        cortex, shared_neuron, "/v1/messages", body, b"event: content_block_delta"
    )


# ---- keys, limits and every error type, on a cortex of their own ----


@pytest.fixture
async def keyed(shared_neuron: NeuronProcess, tmp_path: Path) -> Any:
    """cortex with keys (three per-minute requests each), catalogue models that fail in each
    way, and keep-alives every 10 ms (pings while a prompt is prefilled)."""
    await shared_neuron.wait_serving()
    models = [
        catalogue_model(DEMO_ID),
        catalogue_model("forbidden", path="/elsewhere/model.gguf", memory="1MiB"),
        catalogue_model("broken", path=str(DEMO_GGUF.parent / "missing.gguf"), memory="1MiB"),
        catalogue_model("huge", memory="1000GB"),
    ]
    config = cortex_config(
        [shared_neuron],
        auth={"keys": ["key-a", "key-b"], "requests_per_minute": 3},
        timeouts={"keepalive": 0.01},
    )
    process = CortexProcess(tmp_path / "cortex", config, models=models).start()
    try:
        await process.wait_ready()
        yield process
    finally:
        process.stop()


async def test_keys_in_x_api_key_and_each_error_is_the_sdks_class(keyed: CortexProcess) -> None:
    reply = await client(keyed, "key-a").messages.create(
        model=DEMO_ID,
        max_tokens=4,
        messages=QUESTION,  # type: ignore[arg-type]
    )
    assert reply.content
    bearer = anthropic.AsyncAnthropic(base_url=keyed.url, auth_token="key-a", max_retries=0)
    assert (await bearer.messages.count_tokens(model=DEMO_ID, messages=QUESTION)).input_tokens  # type: ignore[arg-type]
    cases: list[tuple[str, str, type[anthropic.APIStatusError], int, str]] = [
        ("wrong-key", DEMO_ID, anthropic.AuthenticationError, 401, "authentication_error"),
        ("key-a", "forbidden", anthropic.PermissionDeniedError, 403, "permission_error"),
        ("key-b", "broken", anthropic.InternalServerError, 500, "api_error"),
        ("key-b", "huge", anthropic.OverloadedError, 529, "overloaded_error"),
        ("key-b", DEMO_ID, anthropic.RateLimitError, 429, "rate_limit_error"),  # its fourth
    ]
    await client(keyed, "key-b").messages.count_tokens(model=DEMO_ID, messages=QUESTION)  # type: ignore[arg-type]
    for key, model, kind, status, type_ in cases:
        with pytest.raises(kind) as error:
            await client(keyed, key).messages.create(model=model, max_tokens=4, messages=QUESTION)  # type: ignore[arg-type]
        assert error.value.status_code == status, (key, model)
        assert error.value.body == {  # type: ignore[comparison-overlap]
            "type": "error", "error": {"type": type_, "message": error.value.body["error"]["message"]},  # type: ignore[index]
        }  # fmt: skip
        if status in (429, 529):
            assert error.value.response.headers["Retry-After"].isdigit()


async def test_pings_keep_a_waiting_stream_alive_before_its_first_token(
    keyed: CortexProcess,
) -> None:
    # A prompt no earlier request sent (no prefix cache to make its prefill instant): ~1,500
    # tokens to prefill, against a keep-alive every 10 ms.
    rules = f"Session {uuid.uuid4().hex}. " + " ".join(
        f"Rule {i}: answer politely, briefly, in English." for i in range(120)
    )
    body = _body(system=rules, max_tokens=4, stream=True, temperature=0)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            keyed.url + "/v1/messages", json=body, headers={"x-api-key": "key-a"}
        ) as r:
            assert r.status == 200
            events = _events(await r.read())
    names = [e for e, _ in events]
    assert names[0] == "ping" and events[0][1] == {"type": "ping"}
    start = names.index("message_start")
    assert set(names[:start]) == {"ping"}
    assert [n for n in names if n != "ping"][-2:] == ["message_delta", "message_stop"]


async def test_a_draining_cortex_answers_529_with_retry_after(
    shared_neuron: NeuronProcess, tmp_path: Path
) -> None:
    await shared_neuron.wait_serving()
    process = CortexProcess(
        tmp_path / "cortex", cortex_config([shared_neuron]), models=[catalogue_model(DEMO_ID)]
    ).start()
    try:
        await process.wait_ready()
        sdk = client(process)
        story = [{"role": "user", "content": "Write a long story about a cat."}]
        async with sdk.messages.stream(model=DEMO_ID, max_tokens=300, messages=story) as stream:  # type: ignore[arg-type]
            async for _ in stream.text_stream:
                break
            process.send(signal.SIGTERM)
            # The drain's own line: the test's path, in the starting line, says "draining" too.
            await process.wait_log("draining in_flight=")
            with pytest.raises(anthropic.OverloadedError) as error:
                await sdk.messages.create(model=DEMO_ID, max_tokens=4, messages=QUESTION)  # type: ignore[arg-type]
            assert error.value.response.headers["Retry-After"].isdigit()
            assert error.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
            final = await stream.get_final_message()  # the open stream still finishes
        assert final.stop_reason in ("end_turn", "max_tokens")
        assert process.wait_exit(60) == 0
    finally:
        process.stop()
