"""cortex's OpenAI Responses surface: ``/v1/responses``, kept responses, the event sequence.

The first tests parse requests, shape answers and bound the store without processes (events
and responses are checked against the openai SDK's own types, and assembled by its own stream
state). The rest run the real SmolLM2 behind a real neuron and cortex and talk to them with
the openai SDK (``max_retries=0``) and with raw HTTP, the event sequence read as sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from cortex.api.relay import Outcome
from cortex.api.responses import Reply, parse
from cortex.config import ResponsesConfig
from cortex.errors import BadRequest, NeuronFailed, ResponseNotFound
from cortex.responsestore import ResponseStore
from helexa.neuron.v1 import neuron_pb2 as pb
from tests import test_openai_agents as agents
from tests.harness import (
    DEMO_ID,
    CortexProcess,
    NeuronProcess,
    catalogue_model,
    cortex_config,
    leave_stream_and_see_it_cancelled,
    stub_gateway,
)

EVENT = TypeAdapter(ResponseStreamEvent)
# The chat surface's tool in Responses' flat shape.
WEATHER: dict[str, Any] = {"type": "function", **agents.WEATHER["function"]}  # type: ignore[dict-item]
ASK_WEATHER = agents.ASK_WEATHER[0]["content"]
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
        "arguments": '{"city": "Paris"}'}  # fmt: skip


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": DEMO_ID, "input": "Hi", **extra}


def _store(**limits: Any) -> ResponseStore:
    return ResponseStore(ResponsesConfig(**limits))


# ---- parsing, without processes ----


def test_instructions_and_input_items_become_the_chat() -> None:
    body = _body(
        instructions="Be brief.",
        input=[
            {"role": "user", "content": ASK_WEATHER},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
            CALL,
            {"type": "function_call_output", "call_id": "call_1", "output": "22 C"},
            {"role": "developer", "content": [{"type": "input_text", "text": "In Celsius."}]},
        ],
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        max_output_tokens=50,
        temperature=0.5,
        top_p=0.9,
    )  # fmt: skip
    parsed = parse(stub_gateway(), _store(), body)
    request = parsed.generate
    roles = [(m.role, m.content) for m in request.chat.messages]
    assert roles == [
        ("system", "Be brief."), ("user", ASK_WEATHER), ("assistant", "Let me look."),
        ("tool", "22 C"), ("system", "In Celsius."),
    ]  # fmt: skip
    assert list(request.chat.messages[2].tool_calls) == [
        pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    ]
    assert request.chat.messages[3].tool_call_id == "call_1"
    assert [t.name for t in request.tools] == ["get_weather"]
    assert json.loads(request.tools[0].parameters) == WEATHER["parameters"]
    assert request.tool_choice == pb.ToolChoice(
        mode=pb.TOOL_CHOICE_MODE_FUNCTION, function="get_weather"
    )
    assert request.HasField("parallel_tool_calls") and not request.parallel_tool_calls
    assert request.max_tokens == 50 and request.top_p == pytest.approx(0.9)
    assert not parsed.stream and parsed.store and request.message_interval > 0
    # What a later request continues: the conversation without the instructions.
    assert len(parsed.conversation) == 4


def test_text_formats_become_the_output_constraint() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = {"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}}
    request = parse(stub_gateway(), _store(), _body(text=text)).generate
    assert json.loads(request.output.json_schema) == schema
    plain = parse(stub_gateway(), _store(), _body(text={"format": {"type": "json_object"}}))
    assert plain.generate.output.json_object
    free = parse(stub_gateway(), _store(), _body(text={"format": {"type": "text"}}))
    assert not free.generate.HasField("output")


def test_previous_response_id_prepends_its_input_and_output() -> None:
    store = _store()
    first = parse(stub_gateway(), store, _body(input=ASK_WEATHER, tools=[WEATHER]))
    reply = Reply(first, store)
    reply.whole(
        Outcome(finish_reason="tool_calls", tool_calls=[
            pb.ToolCallDelta(index=0, id="call_9", name="get_weather", arguments='{"city":'),
            pb.ToolCallDelta(index=0, arguments='"Paris"}'),
        ])
    )  # fmt: skip
    answer = [{"type": "function_call_output", "call_id": "call_9", "output": "22 C"}]
    second = parse(
        stub_gateway(),
        store,
        _body(previous_response_id=reply.id, input=answer, instructions="Hi!"),
    )
    messages = second.generate.chat.messages
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[2].tool_calls[0] == pb.ToolCall(
        id="call_9", name="get_weather", arguments='{"city":"Paris"}'
    )
    assert messages[3].tool_call_id == "call_9"
    with pytest.raises(ResponseNotFound) as error:
        parse(stub_gateway(), store, _body(previous_response_id="resp_nope"))
    assert error.value.param == "previous_response_id"


BAD = [
    ("no-model", {"input": "Hi"}, "model"),
    ("no-input", {"model": DEMO_ID}, "input"),
    ("empty-input", _body(input=[]), "input"),
    ("input-number", _body(input=5), "input"),
    ("item-not-object", _body(input=["Hi"]), "input[0]"),
    ("item-role", _body(input=[{"role": "tool", "content": "x"}]), "input[0].role"),
    ("item-image", _body(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "input[0].content[0].type"),
    ("item-file", _body(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]), "input[0].content[0].type"),
    ("item-reasoning", _body(input=[{"type": "reasoning", "summary": []}]), "input[0].type"),
    ("item-reference", _body(input=[{"type": "item_reference", "id": "msg_1"}]), "input[0].type"),
    ("call-no-id", _body(input=[{**CALL, "call_id": None}]), "input[0].call_id"),
    ("call-arguments", _body(input=[{**CALL, "arguments": "[1]"}]), "input[0].arguments"),
    ("output-answers-nothing", _body(input=[{"type": "function_call_output", "call_id": "call_7", "output": "x"}]), "input[0].call_id"),
    ("instructions-list", _body(instructions=["a"]), "instructions"),
    ("web-search", _body(tools=[{"type": "web_search"}]), "tools[0].type"),
    ("file-search", _body(tools=[{"type": "file_search", "vector_store_ids": ["v"]}]), "tools[0].type"),
    ("code-interpreter", _body(tools=[{"type": "code_interpreter", "container": {"type": "auto"}}]), "tools[0].type"),
    ("computer", _body(tools=[{"type": "computer_use_preview"}]), "tools[0].type"),
    ("mcp", _body(tools=[{"type": "mcp", "server_label": "x"}]), "tools[0].type"),
    ("chat-shaped-tool", _body(tools=[{"type": "function", "function": {"name": "f"}}]), "tools[0].name"),
    ("tool-name", _body(tools=[{"type": "function", "name": "get weather"}]), "tools[0].name"),
    ("tool-twice", _body(tools=[WEATHER, WEATHER]), "tools[1].name"),
    ("tool-parameters", _body(tools=[{"type": "function", "name": "f", "parameters": []}]), "tools[0].parameters"),
    ("choice-word", _body(tools=[WEATHER], tool_choice="always"), "tool_choice"),
    ("choice-unlisted", _body(tools=[WEATHER], tool_choice={"type": "function", "name": "g"}), "tool_choice"),
    ("choice-hosted", _body(tools=[WEATHER], tool_choice={"type": "web_search_preview"}), "tool_choice.type"),
    ("choice-required-no-tools", _body(tool_choice="required"), "tool_choice"),
    ("format-type", _body(text={"format": {"type": "yaml"}}), "text.format.type"),
    ("format-no-name", _body(text={"format": {"type": "json_schema", "schema": {}}}), "text.format.name"),
    ("format-schema", _body(text={"format": {"type": "json_schema", "name": "A", "schema": "x"}}), "text.format.schema"),
    ("format-with-auto-tools", _body(tools=[WEATHER], text={"format": {"type": "json_object"}}), "text.format"),
    ("verbosity", _body(text={"verbosity": "low"}), "text.verbosity"),
    ("max-output-0", _body(max_output_tokens=0), "max_output_tokens"),
    ("max-output-huge", _body(max_output_tokens=10**6), "max_output_tokens"),
    ("temperature-3", _body(temperature=3), "temperature"),
    ("top-p-0", _body(top_p=0), "top_p"),
    ("stream-string", _body(stream="yes"), "stream"),
    ("store-string", _body(store="no"), "store"),
    ("previous-number", _body(previous_response_id=5), "previous_response_id"),
    ("metadata-number", _body(metadata={"a": 1}), "metadata"),
    ("background", _body(background=True), "background"),
    ("conversation", _body(conversation="conv_1"), "conversation"),
    ("prompt", _body(prompt={"id": "pmpt_1"}), "prompt"),
    ("reasoning", _body(reasoning={"effort": "high"}), "reasoning"),
    ("truncation-auto", _body(truncation="auto"), "truncation"),
    ("include", _body(include=["message.output_text.logprobs"]), "include"),
    ("top-logprobs", _body(top_logprobs=3), "top_logprobs"),
    ("max-tool-calls", _body(max_tool_calls=2), "max_tool_calls"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_field_is_refused_naming_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as error:
        parse(stub_gateway(), _store(), body)
    assert error.value.param == param
    assert error.value.message


def test_fields_openai_accepts_and_we_serve_are_not_refused() -> None:
    parse(
        stub_gateway(),
        _store(),
        _body(
            background=False, truncation="disabled", include=[], top_logprobs=0, reasoning=None,
            store=False, metadata={"k": "v"}, user="u", prompt_cache_key="k", tools=[],
            tool_choice="auto", text={"format": {"type": "text"}},
        ),
    )  # fmt: skip


# ---- answers, without processes ----


def _events(raw: bytes) -> list[dict[str, Any]]:
    """Each SSE event's data, checked against its ``event:`` line and the SDK's types."""
    events = []
    for block in raw.split(b"\n\n"):
        lines = [line for line in block.split(b"\n") if line and not line.startswith(b":")]
        if not lines:
            continue
        assert lines[0].startswith(b"event: ") and lines[1].startswith(b"data: "), block
        data = json.loads(lines[1][6:])
        assert data["type"] == lines[0][7:].decode()
        EVENT.validate_python(data)
        events.append(data)
    numbers = [e["sequence_number"] for e in events]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    return events


TEXT_THEN_CALL = [
    pb.GenerateResponse(text="Let me "),
    pb.GenerateResponse(text="look.", tool_calls=[
        pb.ToolCallDelta(index=0, id="call_a", name="get_weather", arguments='{"ci'),
    ]),
    pb.GenerateResponse(tool_calls=[pb.ToolCallDelta(index=0, arguments='ty": "Paris"}')]),
]  # fmt: skip


def test_streamed_events_are_the_sequence_the_sdk_assembles() -> None:
    from openai import omit
    from openai.lib.streaming.responses._responses import ResponseStreamState

    store = _store()
    reply = Reply(parse(stub_gateway(), store, _body(tools=[WEATHER], stream=True)), store)
    raw = reply.opening()
    for i, message in enumerate(TEXT_THEN_CALL):
        raw += reply.delta(message.text, [message], first=i == 0)
    raw += reply.ending(Outcome(finish_reason="tool_calls", prompt_tokens=9, completion_tokens=4))
    events = _events(raw)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    state: ResponseStreamState[None] = ResponseStreamState(input_tools=[WEATHER], text_format=omit)  # type: ignore[list-item]
    for event in events:
        state.handle_event(EVENT.validate_python(event))  # type: ignore[arg-type]
    final = state._completed_response
    assert final is not None and final.output_text == "Let me look."
    call = final.output[1]
    assert call.type == "function_call" and call.call_id == "call_a"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert final.usage is not None and final.usage.total_tokens == 13
    assert store.get(reply.id) is not None  # kept, as store defaults to true


def test_whole_answer_is_the_sdks_response_and_cut_is_incomplete() -> None:
    store = _store()
    reply = Reply(parse(stub_gateway(), store, _body(max_output_tokens=3, store=False)), store)
    body = reply.whole(
        Outcome(text="Par", finish_reason="length", prompt_tokens=5, completion_tokens=3,
                cached_tokens=4)
    )  # fmt: skip
    response = Response.model_validate(body)
    assert response.status == "incomplete" and response.output_text == "Par"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.input_tokens_details.cached_tokens == 4
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.max_output_tokens == 3 and not response.store
    assert len(store) == 0  # store: false


def test_a_failure_after_the_stream_began_is_an_error_then_response_failed() -> None:
    store = _store()
    reply = Reply(parse(stub_gateway(), store, _body(stream=True)), store)
    raw = reply.opening() + reply.delta("Hi", [pb.GenerateResponse(text="Hi")], first=True)
    raw += reply.failure(NeuronFailed("neuron n0 failed mid-stream"))
    events = _events(raw)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "neuron_failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert len(store) == 0


def test_the_store_keeps_within_count_bytes_and_age() -> None:
    now = [0.0]
    store = ResponseStore(
        ResponsesConfig(max_stored=2, max_age=10.0, max_bytes=4096), clock=lambda: now[0]
    )
    message = [pb.ChatMessage(role="user", content="x")]
    for name in ("a", "b", "c"):
        store.put(name, {"id": name}, message, 100)
    assert store.get("a") is None and store.get("b") and store.get("c")  # the oldest went
    store.put("big", {"id": "big"}, message, 5000)  # larger than max_bytes: not kept
    assert store.get("big") is None and store.get("c")
    store.put("d", {"id": "d"}, message, 3990)
    assert store.get("b") is None and store.get("c") is None and store.get("d")  # bytes
    assert store.delete("d") and not store.delete("d") and store.bytes == 0
    store.put("e", {"id": "e"}, message, 10, owner=b"key-a")
    assert store.get("e") is None and store.get("e", b"key-b") is None
    assert not store.delete("e", b"key-b") and store.get("e", b"key-a") is not None
    now[0] = 9.9
    assert store.get("e", b"key-a") is not None
    now[0] = 10.0
    assert store.get("e", b"key-a") is None and len(store) == 0 and store.bytes == 0


# ---- end to end: the real model behind a real neuron and cortex ----


@pytest.fixture
def cortex(shared_cortex: CortexProcess) -> CortexProcess:
    return shared_cortex


def client(cortex: CortexProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=cortex.api_url, api_key="unused", max_retries=0)


async def test_create_whole_answers_with_usage_and_is_kept(cortex: CortexProcess) -> None:
    sdk = client(cortex)
    response = await sdk.responses.create(
        model=DEMO_ID,
        instructions="Answer in one short sentence.",
        input="What is the capital of France?",
        temperature=0,
        max_output_tokens=24,
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert "Paris" in response.output_text
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens <= 24
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    kept = await sdk.responses.retrieve(response.id)
    assert kept.model_dump() == response.model_dump()


async def test_cut_by_max_output_tokens_is_incomplete(cortex: CortexProcess) -> None:
    response = await client(cortex).responses.create(
        model=DEMO_ID, input="Write a long story about a dragon.", max_output_tokens=4,
        temperature=0,
    )  # fmt: skip
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 4


async def test_create_streamed_with_the_sdks_stream_helper(cortex: CortexProcess) -> None:
    sdk = client(cortex)
    deltas = []
    async with sdk.responses.stream(
        model=DEMO_ID, input="What is the capital of France?", temperature=0,
        max_output_tokens=24,
    ) as stream:  # fmt: skip
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert deltas and "".join(deltas) == final.output_text
    assert "Paris" in final.output_text
    assert (await sdk.responses.retrieve(final.id)).output_text == final.output_text


async def test_raw_event_sequence_in_order_with_rising_sequence_numbers(
    cortex: CortexProcess,
) -> None:
    body = _body(input="What is the capital of France?", temperature=0, max_output_tokens=24,
                 stream=True)  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with session.post(cortex.url + "/v1/responses", json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = await r.read()
    events = _events(raw)
    assert events[0]["sequence_number"] == 0
    types = [e["type"] for e in events]
    assert types[:4] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added",
    ]  # fmt: skip
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert types[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed" if events[-1]["response"]["status"] == "completed"
        else "response.incomplete",
    ]  # fmt: skip
    created = events[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert events[-4]["text"] == text
    final = Response.model_validate(events[-1]["response"])
    assert final.id == created["id"] and final.output_text == text
    assert final.output[0].id == events[2]["item"]["id"]


class Capital(BaseModel):
    city: str
    country: str


async def test_parse_with_a_pydantic_model_returns_the_parsed_object(cortex: CortexProcess) -> None:
    response = await client(cortex).responses.parse(
        model=DEMO_ID,
        input="What is the capital of France? Answer in JSON.",
        text_format=Capital,
        temperature=0,
        max_output_tokens=100,
    )
    assert response.status == "completed"
    assert isinstance(response.output_parsed, Capital), response.output_text


async def _call_weather(sdk: openai.AsyncOpenAI, **extra: Any) -> Any:
    response = await sdk.responses.create(
        model=DEMO_ID, input=ASK_WEATHER, tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
        parallel_tool_calls=False, temperature=0, max_output_tokens=64, **extra,
    )  # fmt: skip
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls, response.output
    for call in calls:
        assert call.call_id.startswith("call_") and call.id and call.id.startswith("fc_")
        assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    return response, calls


async def test_function_call_round_trip_through_previous_response_id(
    cortex: CortexProcess,
) -> None:
    sdk = client(cortex)
    first, calls = await _call_weather(sdk)
    final = await sdk.responses.create(
        model=DEMO_ID,
        previous_response_id=first.id,
        input=[
            {"type": "function_call_output", "call_id": c.call_id, "output": "22 C and sunny"}
            for c in calls
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        temperature=0,
        max_output_tokens=48,
    )
    assert final.previous_response_id == first.id
    assert final.output_text and not [i for i in final.output if i.type == "function_call"]
    # The conversation so far was the prompt: more tokens in than its question alone.
    question = await sdk.responses.create(
        model=DEMO_ID, input=ASK_WEATHER, tools=[WEATHER], tool_choice="none",  # type: ignore[list-item]
        max_output_tokens=1,
    )  # fmt: skip
    assert final.usage is not None and question.usage is not None
    assert final.usage.input_tokens > question.usage.input_tokens + 10


async def test_function_call_round_trip_through_full_input_items(cortex: CortexProcess) -> None:
    sdk = client(cortex)
    first, calls = await _call_weather(sdk, store=False)
    with pytest.raises(openai.NotFoundError):  # store: false keeps nothing
        await sdk.responses.retrieve(first.id)
    items: list[Any] = [
        {"role": "user", "content": ASK_WEATHER},
        *(item.model_dump(exclude_none=True) for item in first.output),
        *({"type": "function_call_output", "call_id": c.call_id, "output": "22 C and sunny"}
          for c in calls),
    ]  # fmt: skip
    final = await sdk.responses.create(
        model=DEMO_ID, input=items, tools=[WEATHER], tool_choice="none",  # type: ignore[list-item]
        temperature=0, max_output_tokens=48, store=False,
    )  # fmt: skip
    assert final.output_text and final.status in ("completed", "incomplete")


async def test_retrieve_delete_then_404_and_unknown_ids_are_404(cortex: CortexProcess) -> None:
    sdk = client(cortex)
    response = await sdk.responses.create(model=DEMO_ID, input="Hi", max_output_tokens=2)
    assert (await sdk.responses.retrieve(response.id)).id == response.id
    await sdk.responses.delete(response.id)
    for call in (sdk.responses.retrieve, sdk.responses.delete):
        with pytest.raises(openai.NotFoundError) as error:
            await call(response.id)
        assert error.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve("resp_unknown")
    with pytest.raises(openai.NotFoundError) as error:
        await sdk.responses.create(
            model=DEMO_ID, input="Hi", previous_response_id=response.id, max_output_tokens=2
        )
    assert error.value.param == "previous_response_id"  # type: ignore[attr-defined]


async def test_kept_responses_are_their_keys_own_and_expire_after_max_age(
    shared_neuron: NeuronProcess, tmp_path: Any
) -> None:
    process = CortexProcess(
        tmp_path / "cortex",
        cortex_config([shared_neuron], responses={"max_age": 2.0}, auth={"keys": ["ka", "kb"]}),
        models=[catalogue_model(DEMO_ID, pinned=True)],
    ).start()
    try:
        await process.wait_ready()
        owner = openai.AsyncOpenAI(base_url=process.api_url, api_key="ka", max_retries=0)
        other = openai.AsyncOpenAI(base_url=process.api_url, api_key="kb", max_retries=0)
        asked = time.monotonic()  # before cortex made it: its max_age runs from a later time
        response = await owner.responses.create(model=DEMO_ID, input="Hi", max_output_tokens=2)
        created = time.monotonic()
        assert (await owner.responses.retrieve(response.id)).id == response.id
        with pytest.raises(openai.NotFoundError):  # another key's response is not there
            await other.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.delete(response.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.create(
                model=DEMO_ID, input="Hi", previous_response_id=response.id, max_output_tokens=2
            )
        deadline = created + 30
        while True:
            try:
                await owner.responses.retrieve(response.id)
            except openai.NotFoundError:
                break
            assert time.monotonic() < deadline, "the response was never forgotten"
            await asyncio.sleep(0.2)
        # Never forgotten before its max_age (a lower bound that a slow machine only widens).
        assert time.monotonic() - asked >= 2.0
    finally:
        process.stop()


@pytest.mark.parametrize(
    ("body", "param"),
    [pytest.param(*c[1:], id=c[0]) for c in BAD if c[0] in (
        "no-input", "item-image", "web-search", "code-interpreter", "choice-unlisted",
        "format-schema", "output-answers-nothing", "reasoning", "background",
    )]
    + [pytest.param(_body(tools=[{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}], tool_choice="required"), "tools[0].parameters", id="neuron-refuses-schema")],
)  # fmt: skip
async def test_bad_input_is_a_400_naming_the_param_and_cortex_keeps_serving(
    cortex: CortexProcess, body: dict[str, Any], param: str
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            cortex.url + "/v1/responses", json={**body, "max_output_tokens": 2}
        ) as r:
            assert r.status == 400, await r.text()
            error = (await r.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["message"]
        assert error["param"] == param, error
        async with session.post(cortex.url + "/v1/responses", json=_body(max_output_tokens=2)) as r:
            assert r.status == 200, await r.text()


async def test_client_leaving_a_stream_cancels_the_generation_on_the_neuron(
    cortex: CortexProcess, shared_neuron: NeuronProcess
) -> None:
    body = _body(input="Write a very long story about a dragon.", max_output_tokens=2000,
                 temperature=0.7, stream=True)  # fmt: skip
    await leave_stream_and_see_it_cancelled(
        cortex, shared_neuron, "/v1/responses", body, b"event: response.output_text.delta"
    )


@pytest.mark.parametrize(
    ("field", "param"),
    [
        ("tools[3].parameters", "tools[3].parameters"),
        ("output.json_schema", "text.format.schema"),
        ("output", "text.format"),
        ("tool_choice.function", "tool_choice"),
        ("chat.messages[2].tool_calls[1].arguments", "input"),
        ("max_tokens", "max_output_tokens"),
        ("logit_bias", "logit_bias"),
    ],
)
def test_the_neurons_field_paths_become_responses_params(field: str, param: str) -> None:
    reply = Reply(parse(stub_gateway(), _store(), _body()), _store())
    assert reply.param(field) == param


def test_requests_and_answers_match_the_served_openapi_description() -> None:
    import jsonschema

    from cortex.api.openapi import DOCUMENT

    def schema(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}", "components": DOCUMENT["components"]}

    store = _store()
    body = _body(
        input=[{"role": "user", "content": ASK_WEATHER}, CALL,
               {"type": "function_call_output", "call_id": "call_1", "output": "22 C"}],
        instructions="Be brief.", tools=[WEATHER], tool_choice="required", store=True,
        text={"format": {"type": "json_object"}}, max_output_tokens=5, metadata={"k": "v"},
    )  # fmt: skip
    jsonschema.validate(body, schema("ResponseRequest"))
    reply = Reply(parse(stub_gateway(), store, body), store)
    calls = Outcome(finish_reason="tool_calls", tool_calls=[
        pb.ToolCallDelta(index=0, id="call_2", name="get_weather", arguments='{"city":"Nice"}')
    ])  # fmt: skip
    jsonschema.validate(reply.whole(calls), schema("Response"))
    text = Reply(parse(stub_gateway(), store, _body()), store)
    jsonschema.validate(text.whole(Outcome(text="Hi", finish_reason="stop")), schema("Response"))


def test_any_json_in_the_responses_fields_parses_or_is_a_bad_request() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from cortex.api.relay import checked

    text, anything = agents.small_json()
    part = st.fixed_dictionaries(
        {"type": st.sampled_from(["input_text", "output_text", "input_image"]) | anything},
        optional={"text": text | anything},
    )
    item = st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["message", "function_call", "function_call_output"])
            | anything,
            "role": st.sampled_from(["user", "assistant", "developer"]) | anything,
            "content": text | st.lists(part, max_size=2) | anything,
            "call_id": st.sampled_from(["call_1", "call_2"]) | anything,
            "name": text | anything, "arguments": st.just("{}") | text | anything,
            "output": text | anything,
        },
    )  # fmt: skip
    tool = st.fixed_dictionaries(
        {"type": st.just("function") | anything, "name": st.from_regex(r"[a-z_]{1,8}", fullmatch=True) | anything},
        optional={"parameters": anything, "strict": anything, "description": anything},
    )  # fmt: skip
    body = st.fixed_dictionaries(
        {"model": st.just(DEMO_ID), "input": text | st.lists(item, min_size=1, max_size=4)},
        optional={
            "instructions": text | anything, "tools": st.lists(tool, max_size=2) | anything,
            "tool_choice": st.sampled_from(["auto", "none", "required"]) | anything,
            "text": st.fixed_dictionaries({"format": anything}) | anything,
            "previous_response_id": text | anything, "store": anything, "stream": anything,
            "metadata": anything, "max_output_tokens": anything, "temperature": anything,
            "top_p": anything, "truncation": anything, "include": anything,
            "background": anything, "reasoning": anything, "parallel_tool_calls": anything,
        },
    )  # fmt: skip

    @settings(max_examples=500, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(body)
    def check(body: dict[str, Any]) -> None:
        try:
            checked(parse, stub_gateway(), _store(), body)
        except (BadRequest, ResponseNotFound) as e:
            assert e.message and (e.param is None or isinstance(e.param, str))

    check()
