"""cortex's OpenAI surface for agents: tools and tool calls, output formats, logprobs, cached
prompt tokens, and the fields it refuses by name.

The first tests parse requests and shape answers without processes (answers are checked
against the openai SDK's own types). The rest run the real SmolLM2 behind a real neuron and
cortex (the shared ones) and talk to them with the openai SDK (``max_retries=0``): the neuron
enforces the constraints, cortex translates the dialect both ways.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from cortex.api import fields
from cortex.api.openai import Answer, Outcome, Parsed, parse_chat, parse_completion
from cortex.errors import BadRequest
from cortex.router import openai_param
from helexa.neuron.v1 import neuron_pb2 as pb
from tests.harness import DEMO_ID, CortexProcess, NeuronProcess, metric_value, stub_gateway

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": DEMO_ID, "messages": [{"role": "user", "content": "Hi"}], **extra}


# ---- parsing, without processes ----


def test_tools_tool_choice_and_history_become_the_proto() -> None:
    body = _chat(
        messages=[
            *ASK_WEATHER,
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": [{"type": "text", "text": "22 C"}],
            },
        ],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
    )
    request = parse_chat(stub_gateway(), body).generate
    assert [t.name for t in request.tools] == ["get_weather", "get_time"]
    assert json.loads(request.tools[0].parameters) == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert request.tools[0].description == "The current weather in a city"
    assert request.tool_choice == pb.ToolChoice(
        mode=pb.TOOL_CHOICE_MODE_FUNCTION, function="get_time"
    )
    assert request.HasField("parallel_tool_calls") and not request.parallel_tool_calls
    assistant, tool = request.chat.messages[1], request.chat.messages[2]
    assert assistant.content == "" and list(assistant.tool_calls) == [
        pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    ]
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "call_1", "22 C")
    assert not request.HasField("output")


@pytest.mark.parametrize(
    ("choice", "mode"),
    [("auto", pb.TOOL_CHOICE_MODE_AUTO), ("none", pb.TOOL_CHOICE_MODE_NONE),
     ("required", pb.TOOL_CHOICE_MODE_REQUIRED)],
)  # fmt: skip
def test_tool_choice_modes(choice: str, mode: int) -> None:
    request = parse_chat(stub_gateway(), _chat(tools=[WEATHER], tool_choice=choice)).generate
    assert request.tool_choice.mode == mode


def test_output_formats_logprobs_penalties_and_bias_become_the_proto() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    request = parse_chat(
        stub_gateway(),
        _chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "A", "schema": schema, "strict": True},
            },
            logprobs=True,
            top_logprobs=3,
            presence_penalty=0.5,
            frequency_penalty=-1,
            logit_bias={"42": -100, "7": 2.5},
        ),
    ).generate
    assert json.loads(request.output.json_schema) == schema
    assert request.logprobs and request.top_logprobs == 3
    assert request.presence_penalty == 0.5 and request.frequency_penalty == -1
    assert dict(request.logit_bias) == {42: -100.0, 7: 2.5}
    plain = parse_chat(stub_gateway(), _chat(response_format={"type": "json_object"})).generate
    assert plain.output.json_object
    text = parse_chat(stub_gateway(), _chat(response_format={"type": "text"})).generate
    assert not text.HasField("output") and not text.HasField("presence_penalty")
    # response_format with tools is fine when the text cannot be a call (tool_choice none),
    # and moot when the answer must be one.
    none = _chat(tools=[WEATHER], tool_choice="none", response_format={"type": "json_object"})
    assert parse_chat(stub_gateway(), none).generate.output.json_object
    forced = _chat(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})
    assert not parse_chat(stub_gateway(), forced).generate.HasField("output")
    completion = parse_completion(stub_gateway(), {"model": DEMO_ID, "prompt": "x", "logprobs": 2})
    assert completion.generate.logprobs and completion.generate.top_logprobs == 2


def _tool_message(**extra: Any) -> list[dict[str, Any]]:
    return [*ASK_WEATHER, {"role": "assistant", "tool_calls": [{**CALL, **extra}]}]


BAD_FIELDS = [
    ("tools-not-list", _chat(tools={"a": 1}), "tools"),
    ("tools-too-many", _chat(tools=[{**WEATHER, "function": {**WEATHER["function"], "name": f"f{i}"}} for i in range(fields.MAX_TOOLS + 1)]), "tools"),  # type: ignore[dict-item]
    ("tool-type", _chat(tools=[{**WEATHER, "type": "custom"}]), "tools[0].type"),
    ("tool-name-pattern", _chat(tools=[{"type": "function", "function": {"name": "get weather"}}]), "tools[0].function.name"),
    ("tool-name-long", _chat(tools=[{"type": "function", "function": {"name": "x" * 65}}]), "tools[0].function.name"),
    ("tool-name-twice", _chat(tools=[WEATHER, WEATHER]), "tools[1].function.name"),
    ("tool-parameters-list", _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]), "tools[0].function.parameters"),
    ("tool-strict-string", _chat(tools=[{"type": "function", "function": {"name": "f", "strict": "yes"}}]), "tools[0].function.strict"),
    ("tool-choice-word", _chat(tools=[WEATHER], tool_choice="always"), "tool_choice"),
    ("tool-choice-unlisted", _chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice"),
    ("tool-choice-required-no-tools", _chat(tool_choice="required"), "tool_choice"),
    ("parallel-string", _chat(tools=[WEATHER], parallel_tool_calls="no"), "parallel_tool_calls"),
    ("arguments-not-json", _chat(messages=_tool_message(function={"name": "get_weather", "arguments": "{city: Paris"})), "messages[1].tool_calls[0].function.arguments"),
    ("arguments-a-list", _chat(messages=_tool_message(function={"name": "get_weather", "arguments": "[1]"})), "messages[1].tool_calls[0].function.arguments"),
    ("arguments-an-object", _chat(messages=_tool_message(function={"name": "get_weather", "arguments": {"city": "Paris"}})), "messages[1].tool_calls[0].function.arguments"),
    ("call-without-id", _chat(messages=_tool_message(id=None)), "messages[1].tool_calls[0].id"),
    ("user-with-calls", _chat(messages=[{"role": "user", "content": "x", "tool_calls": [CALL]}]), "messages[0].tool_calls"),
    ("tool-without-call-id", _chat(messages=[*_tool_message(), {"role": "tool", "content": "22 C"}]), "messages[2].tool_call_id"),
    ("tool-answers-no-call", _chat(messages=[*ASK_WEATHER, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]), "messages[1].tool_call_id"),
    ("format-type", _chat(response_format={"type": "yaml"}), "response_format.type"),
    ("format-string", _chat(response_format="json"), "response_format"),
    ("schema-missing", _chat(response_format={"type": "json_schema", "json_schema": {"name": "A"}}), "response_format.json_schema.schema"),
    ("schema-not-object", _chat(response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": "object"}}), "response_format.json_schema.schema"),
    ("schema-no-name", _chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), "response_format.json_schema.name"),
    ("tools-with-format", _chat(tools=[WEATHER], response_format={"type": "json_object"}), "response_format"),
    ("logprobs-int", _chat(logprobs=1), "logprobs"),
    ("top-logprobs-alone", _chat(top_logprobs=2), "top_logprobs"),
    ("top-logprobs-21", _chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("top-logprobs-negative", _chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ("presence-3", _chat(presence_penalty=3), "presence_penalty"),
    ("frequency-string", _chat(frequency_penalty="lots"), "frequency_penalty"),
    ("bias-key-word", _chat(logit_bias={"hello": 1}), "logit_bias"),
    ("bias-key-negative", _chat(logit_bias={"-1": 1}), "logit_bias"),
    ("bias-value-200", _chat(logit_bias={"5": 200}), "logit_bias"),
    ("bias-value-string", _chat(logit_bias={"5": "up"}), "logit_bias"),
    ("bias-list", _chat(logit_bias=[5]), "logit_bias"),
    ("n-2", _chat(n=2), "n"),
    ("audio", _chat(audio={"voice": "alloy", "format": "mp3"}), "audio"),
    ("modalities-audio", _chat(modalities=["text", "audio"]), "modalities"),
    ("functions", _chat(functions=[WEATHER["function"]]), "functions"),
    ("function-call", _chat(function_call="auto"), "function_call"),
    ("prediction", _chat(prediction={"type": "content", "content": "x"}), "prediction"),
    ("web-search", _chat(web_search_options={}), "web_search_options"),
    ("image-part", _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "messages[0].content"),
]  # fmt: skip
BAD_COMPLETIONS = [
    ("completion-logprobs-6", {"logprobs": 6}, "logprobs"),
    ("completion-logprobs-true", {"logprobs": True}, "logprobs"),
    ("completion-echo", {"echo": True}, "echo"),
    ("completion-suffix", {"suffix": "end"}, "suffix"),
    ("completion-best-of", {"best_of": 3}, "best_of"),
    ("completion-tools", {"tools": [WEATHER]}, "tools"),
    ("completion-format", {"response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize(("body", "param"), [pytest.param(*c[1:], id=c[0]) for c in BAD_FIELDS])
def test_bad_chat_field_is_refused_naming_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as error:
        parse_chat(stub_gateway(), body)
    assert error.value.param == param
    assert error.value.message


@pytest.mark.parametrize(
    ("extra", "param"), [pytest.param(*c[1:], id=c[0]) for c in BAD_COMPLETIONS]
)
def test_bad_completion_field_is_refused_naming_it(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as error:
        parse_completion(stub_gateway(), {"model": DEMO_ID, "prompt": "x", **extra})
    assert error.value.param == param


def test_fields_openai_accepts_and_we_serve_are_not_refused() -> None:
    body = _chat(
        modalities=["text"],
        tools=[],
        tool_choice="auto",
        echo=None,
        logprobs=False,
        audio=None,
        response_format={"type": "text"},
    )
    parse_chat(stub_gateway(), body)
    parse_completion(stub_gateway(), {"model": DEMO_ID, "prompt": "x", "echo": False, "best_of": 1})


@pytest.mark.parametrize(
    ("field", "param"),
    [
        ("tools[3].parameters", "tools[3].function.parameters"),
        ("tools[0].name", "tools[0].function.name"),
        ("output.json_schema", "response_format.json_schema.schema"),
        ("output", "response_format"),
        ("tool_choice.function", "tool_choice"),
        ("chat.messages[2].tool_calls[1].arguments", "messages[2].tool_calls[1].function.arguments"),
        ("chat.messages[0].role", "messages[0].role"),
        ("chat.messages", "messages"),
        ("top_logprobs", "top_logprobs"),
        ("logit_bias", "logit_bias"),
        ("max_tokens", "max_tokens"),
    ],
)  # fmt: skip
def test_the_neurons_field_paths_become_openai_params(field: str, param: str) -> None:
    assert openai_param(field) == param


# ---- answers, without processes ----


def _answer(kind: str, **generate: Any) -> Answer:
    request = pb.GenerateRequest(**generate)
    return Answer(kind, Parsed(DEMO_ID, request, stream=True, include_usage=True))


def _token(text: str, logprob: float, *top: tuple[str, float]) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token=text,
        logprob=logprob,
        bytes=text.encode(),
        top=[pb.TopLogprob(token=t, logprob=p, bytes=t.encode()) for t, p in top],
    )


CALL_PIECES = [
    pb.ToolCallDelta(index=0, id="call_a", name="get_weather", arguments='{"ci'),
    pb.ToolCallDelta(index=0, arguments='ty": "Paris"}'),
    pb.ToolCallDelta(index=1, id="call_b", name="get_time", arguments=""),
    pb.ToolCallDelta(index=1, arguments='{"zone": "CET"}'),
]


def test_whole_chat_answer_with_tool_calls_and_logprobs_is_openais_shape() -> None:
    answer = _answer("chat", logprobs=True, top_logprobs=2)
    outcome = Outcome(
        finish_reason="tool_calls", prompt_tokens=20, completion_tokens=2, cached_tokens=16,
        tool_calls=CALL_PIECES,
        logprobs=[_token("{", -0.1, ("{", -0.1), ("[", -3.0)), _token("}", float("-inf"))],
    )  # fmt: skip
    body = answer.whole(outcome)
    json.dumps(body, allow_nan=False)
    reply = ChatCompletion.model_validate(body)
    message = reply.choices[0].message
    assert message.content is None and message.refusal is None
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []] == [  # type: ignore[union-attr]
        ("call_a", "get_weather", {"city": "Paris"}), ("call_b", "get_time", {"zone": "CET"})
    ]  # fmt: skip
    assert reply.choices[0].finish_reason == "tool_calls"
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == ["{", "}"]
    assert logprobs.content[0].bytes == [ord("{")]
    assert [t.token for t in logprobs.content[0].top_logprobs] == ["{", "["]
    assert logprobs.content[1].logprob == -9999.0
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 16
    text = _answer("chat").whole(Outcome(text="Hi", finish_reason="stop"))
    assert text["choices"][0]["message"] == {"role": "assistant", "content": "Hi", "refusal": None}
    assert text["choices"][0]["logprobs"] is None


def test_streamed_tool_calls_assemble_as_the_sdk_does() -> None:
    answer = _answer("chat", tools=[pb.Tool(name="get_weather"), pb.Tool(name="get_time")])
    writes = [CALL_PIECES[:1], CALL_PIECES[1:3], CALL_PIECES[3:]]
    chunks = []
    for i, pieces in enumerate(writes):
        raw = answer.delta_chunk("", [pb.GenerateResponse(tool_calls=pieces)], first=i == 0)
        chunks += [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    first = chunks[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": None}
    opening = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert opening == {
        "index": 0, "id": "call_a", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"ci'},
    }  # fmt: skip
    # A later piece of a call carries only its index and arguments; pieces of one call in one
    # write are joined.
    second = chunks[2]["choices"][0]["delta"]["tool_calls"]
    assert second[0] == {"index": 0, "function": {"arguments": 'ty": "Paris"}'}}
    assert second[1]["id"] == "call_b" and second[1]["function"]["arguments"] == ""
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    from openai.lib.streaming.chat._completions import ChatCompletionStreamState

    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    end = answer.chunk(None, "tool_calls")
    state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(end[6:])))
    calls = state.get_final_completion().choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("call_a", "get_weather", '{"city": "Paris"}'), ("call_b", "get_time", '{"zone": "CET"}')
    ]  # fmt: skip


def test_plain_text_writes_keep_the_text_fast_path() -> None:
    answer = _answer("chat")
    message = pb.GenerateResponse(text="Paris")
    assert answer.delta_chunk("Paris", [message], first=False) == answer.text_chunk("Paris")
    head = answer.delta_chunk("Paris", [message], first=True)
    assert head == answer.chunk("", None, role=True) + answer.text_chunk("Paris")


def test_completion_logprobs_shape_and_offsets() -> None:
    answer = _answer("completion", logprobs=True, top_logprobs=1)
    tokens = [_token(" Paris", -0.5, (" Paris", -0.5)), _token(".", -1.0, ("!", -0.9))]
    body = answer.whole(Outcome(text=" Paris.", finish_reason="stop", logprobs=tokens))
    Completion.model_validate(body)
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs == {
        "tokens": [" Paris", "."],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{" Paris": -0.5}, {"!": pytest.approx(-0.9), ".": -1.0}],
        "text_offset": [0, 6],
    }
    streamed = _answer("completion", logprobs=True)
    chunks = [
        json.loads(streamed.delta_chunk(t.token, [pb.GenerateResponse(text=t.token, logprobs=[t])], first=i == 0)[6:])
        for i, t in enumerate(tokens)
    ]  # fmt: skip
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [[0], [6]]
    assert chunks[1]["choices"][0]["logprobs"]["tokens"] == ["."]


# ---- end to end: the real model behind a real neuron and cortex ----


@pytest.fixture
def cortex(shared_cortex: CortexProcess) -> CortexProcess:
    return shared_cortex


def client(cortex: CortexProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=cortex.api_url, api_key="unused", max_retries=0)


class Capital(BaseModel):
    city: str
    country: str


async def test_parse_with_a_pydantic_model_returns_the_parsed_object(cortex: CortexProcess) -> None:
    reply = await client(cortex).chat.completions.parse(
        model=DEMO_ID,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        response_format=Capital,
        temperature=0,
        max_tokens=100,
    )
    message = reply.choices[0].message
    assert isinstance(message.parsed, Capital), message.content
    assert reply.choices[0].finish_reason == "stop"


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["pilot", "doctor", "chef"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
SEEDS = range(20)


async def _schema_answer(cortex: CortexProcess, seed: int, stream: bool) -> str:
    params: dict[str, Any] = {
        "model": DEMO_ID,
        "messages": [{"role": "user", "content": "Describe a person as JSON."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
        "temperature": 1,
        "seed": seed,
        "max_tokens": 200,
    }
    sdk = client(cortex)
    if not stream:
        reply = await sdk.chat.completions.create(**params)
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        return reply.choices[0].message.content or ""
    chunks = await sdk.chat.completions.create(**params, stream=True)
    text, finish = "", None
    async for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop", text
    return text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_strict_json_schema_answers_validate_for_twenty_seeds(
    cortex: CortexProcess, stream: bool
) -> None:
    # Eight at a time: within the shared neuron's batch, so none waits out its queue timeout
    # on a loaded machine.
    slots = asyncio.Semaphore(8)

    async def one(seed: int) -> str:
        async with slots:
            return await _schema_answer(cortex, seed, stream)

    answers = await asyncio.gather(*(one(s) for s in SEEDS))
    for seed, text in zip(SEEDS, answers, strict=True):
        jsonschema.validate(json.loads(text), PERSON), (seed, text)


async def test_json_object_answer_is_a_json_object(cortex: CortexProcess) -> None:
    reply = await client(cortex).chat.completions.create(
        model=DEMO_ID,
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
async def test_forced_tool_call_whole_names_the_tool(cortex: CortexProcess, choice: Any) -> None:
    reply = await client(cortex).chat.completions.create(
        model=DEMO_ID, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice=choice,  # type: ignore[list-item]
        parallel_tool_calls=False, temperature=0, max_tokens=64,
    )  # fmt: skip
    result = reply.choices[0]
    assert result.finish_reason == "tool_calls"
    assert result.message.content is None
    calls = result.message.tool_calls or []
    assert calls, result.message
    if isinstance(choice, dict):
        assert len(calls) == 1 and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
        arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
        schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]  # type: ignore[union-attr]
        jsonschema.validate(arguments, schema["parameters"])  # type: ignore[index]


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
async def test_forced_tool_call_streamed_assembles_with_the_sdk(
    cortex: CortexProcess, choice: Any
) -> None:
    async with client(cortex).chat.completions.stream(
        model=DEMO_ID, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice=choice,  # type: ignore[list-item]
        parallel_tool_calls=False, temperature=0, max_tokens=64,
    ) as stream:  # fmt: skip
        done = [e async for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = await stream.get_final_completion()
    result = final.choices[0]
    assert result.finish_reason == "tool_calls"
    calls = result.message.tool_calls or []
    assert calls and len(done) == len(calls)
    if isinstance(choice, dict):
        assert [c.function.name for c in calls] == ["get_time"]
    for call in calls:
        assert call.id.startswith("call_")
        assert isinstance(call.function.parsed_arguments, dict)  # strict tools: the SDK parses


async def test_parallel_calls_cut_by_max_tokens_hold_only_their_arguments(
    cortex: CortexProcess,
) -> None:
    # SmolLM2 asked for calls with parallel calls allowed calls again and again until
    # max_tokens; every call but a cut last one must still be its JSON arguments alone.
    reply = await client(cortex).chat.completions.create(
        model=DEMO_ID, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice="required",  # type: ignore[list-item]
        temperature=0, max_tokens=64,
    )  # fmt: skip
    result = reply.choices[0]
    calls = result.message.tool_calls or []
    assert calls
    complete = calls[:-1] if result.finish_reason == "length" else calls
    for call in complete:
        assert isinstance(json.loads(call.function.arguments), dict), call  # type: ignore[union-attr]
    for call in calls:
        assert "</tool" not in call.function.arguments, call  # type: ignore[union-attr]


async def test_streamed_tool_call_deltas_are_openais_shape(cortex: CortexProcess) -> None:
    body = _chat(
        messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", temperature=0,
        parallel_tool_calls=False, max_tokens=64, stream=True,
    )  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            raw = await r.read()
    events = [e[6:] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [p for c in chunks for p in c["choices"][0]["delta"].get("tool_calls", [])]
    assert pieces
    opened: set[int] = set()
    for piece in pieces:
        if piece["index"] not in opened:
            opened.add(piece["index"])
            assert piece["id"].startswith("call_") and piece["type"] == "function"
            assert piece["function"]["name"] == "get_weather"
            assert isinstance(piece["function"]["arguments"], str)
        else:
            assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tool_round_trip_call_result_then_answer(cortex: CortexProcess) -> None:
    sdk = client(cortex)
    first = await sdk.chat.completions.create(
        model=DEMO_ID, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
        parallel_tool_calls=False, temperature=0, max_tokens=64,
    )  # fmt: skip
    message = first.choices[0].message
    assert message.tool_calls
    history: list[Any] = [
        *ASK_WEATHER,
        message.model_dump(exclude_none=True),
        *(
            {"role": "tool", "tool_call_id": call.id, "content": "22 C and sunny"}
            for call in message.tool_calls
        ),
    ]
    final = await sdk.chat.completions.create(
        model=DEMO_ID, messages=history, tools=[WEATHER], tool_choice="none",  # type: ignore[list-item]
        temperature=0, max_tokens=48,
    )  # fmt: skip
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert answer.message.content and not answer.message.tool_calls


async def test_tool_choice_none_answers_text_without_calls(cortex: CortexProcess) -> None:
    reply = await client(cortex).chat.completions.create(
        model=DEMO_ID, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none",  # type: ignore[list-item]
        temperature=0, max_tokens=32,
    )  # fmt: skip
    result = reply.choices[0]
    assert result.message.tool_calls is None
    assert result.message.content and result.finish_reason in ("stop", "length")


async def test_chat_logprobs_whole_and_streamed(cortex: CortexProcess) -> None:
    params: dict[str, Any] = {
        "model": DEMO_ID, "messages": [{"role": "user", "content": "Say hello."}],
        "temperature": 0, "max_tokens": 8, "logprobs": True, "top_logprobs": 3,
    }  # fmt: skip
    sdk = client(cortex)
    reply = await sdk.chat.completions.create(**params)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert reply.usage is not None and len(logprobs.content) == reply.usage.completion_tokens
    for token in logprobs.content:
        assert token.logprob <= 0 and token.bytes is not None
        tops = [t.logprob for t in token.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert token.logprob <= tops[0] + 1e-4  # greedy: the sampled token is the likeliest
    assert "".join(t.token for t in logprobs.content) == reply.choices[0].message.content
    streamed = []
    async for chunk in await sdk.chat.completions.create(**params, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert [t.token for t in streamed] == [t.token for t in logprobs.content]
    plain = await sdk.chat.completions.create(**{**params, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


async def test_completion_logprobs_shape(cortex: CortexProcess) -> None:
    reply = await client(cortex).completions.create(
        model=DEMO_ID, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.top_logprobs
    assert logprobs.token_logprobs and logprobs.text_offset is not None
    assert "".join(logprobs.tokens) == reply.choices[0].text
    n = len(logprobs.tokens)
    assert (
        len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == n
    )
    assert logprobs.text_offset[0] == 0
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True):
        assert token in top and 1 <= len(top) <= 3


async def test_repeated_long_prompt_reports_cached_tokens(cortex: CortexProcess) -> None:
    rules = " ".join(f"Rule {i}: answer politely and briefly, in English." for i in range(40))
    messages = [{"role": "system", "content": rules}, {"role": "user", "content": "Hi"}]
    sdk = client(cortex)
    usages = []
    for _ in range(2):
        reply = await sdk.chat.completions.create(
            model=DEMO_ID,
            messages=messages,
            temperature=0,
            max_tokens=2,  # type: ignore[arg-type]
        )
        usages.append(reply.usage)
    second = usages[1]
    assert second is not None and second.prompt_tokens_details is not None
    assert second.prompt_tokens > 300
    assert second.prompt_tokens_details.cached_tokens is not None
    assert second.prompt_tokens_details.cached_tokens > 300
    stream = await sdk.chat.completions.create(
        model=DEMO_ID, messages=messages, temperature=0, max_tokens=2, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    usage = [c.usage async for c in stream if c.usage is not None]
    assert usage and usage[0].prompt_tokens_details is not None
    assert (usage[0].prompt_tokens_details.cached_tokens or 0) > 300


async def test_models_have_a_real_created_time(cortex: CortexProcess) -> None:
    import time

    models = await client(cortex).models.list()
    for model in models.data:
        assert 1_700_000_000 < model.created <= time.time()


# Refused by the neuron (it compiles schemas and knows the vocabulary): cortex names the
# client's field.
NEURON_REFUSES = [
    ("bad-tool-schema", _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}], tool_choice="required"), "tools[0].function.parameters"),
    ("bad-output-schema", _chat(response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": {"type": "object", "properties": {"a": {"type": 5}}}}}), "response_format.json_schema.schema"),
    ("bias-beyond-vocabulary", _chat(logit_bias={"4000000000": 1}), "logit_bias"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param"),
    [pytest.param(*c[1:], id=c[0]) for c in [*BAD_FIELDS, *NEURON_REFUSES]]
    + [
        pytest.param({"model": DEMO_ID, "prompt": "x", **c[1]}, c[2], id=c[0])
        for c in BAD_COMPLETIONS
    ],
)
async def test_bad_agent_input_is_a_400_naming_the_param_and_both_keep_serving(
    cortex: CortexProcess, shared_neuron: NeuronProcess, body: dict[str, Any], param: str
) -> None:
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(cortex.url + path, json={**body, "max_tokens": 2}) as r:
            assert r.status == 400, await r.text()
            error = (await r.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["message"]
        assert error["param"] == param, error
        async with session.post(cortex.url + "/v1/chat/completions", json=_chat(max_tokens=2)) as r:
            assert r.status == 200, await r.text()
    assert shared_neuron.proc is not None and shared_neuron.proc.poll() is None


async def test_constrained_requests_are_counted_by_kind(cortex: CortexProcess) -> None:
    before = metric_value(
        cortex.metrics(), "helexa_gateway_constrained_requests_total", kind="json_object"
    )
    await client(cortex).chat.completions.create(
        model=DEMO_ID, messages=[{"role": "user", "content": "A JSON object, please."}],
        response_format={"type": "json_object"}, max_tokens=2,
    )  # fmt: skip
    after = metric_value(
        cortex.metrics(), "helexa_gateway_constrained_requests_total", kind="json_object"
    )
    assert after == before + 1


def test_answers_match_the_served_openapi_description() -> None:
    from cortex.api.openapi import DOCUMENT

    def schema(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}", "components": DOCUMENT["components"]}

    calls = Outcome(finish_reason="tool_calls", tool_calls=CALL_PIECES)
    chat = _answer("chat", logprobs=True).whole(calls)
    jsonschema.validate(chat, schema("ChatCompletion"))
    text = _answer("completion", logprobs=True).whole(
        Outcome(text=" Paris", finish_reason="stop", logprobs=[_token(" Paris", -0.5)])
    )
    jsonschema.validate(text, schema("Completion"))
    request = _chat(
        messages=[*_tool_message(), {"role": "tool", "tool_call_id": "call_1", "content": "x"}],
        tools=[WEATHER], tool_choice="required", logprobs=True, top_logprobs=2,
        logit_bias={"5": 1}, response_format={"type": "json_object"},
    )  # fmt: skip
    jsonschema.validate(request, schema("ChatCompletionRequest"))


def small_json() -> tuple[Any, Any]:
    """Hypothesis strategies for short strings and small JSON values of any shape, to send in
    a surface's fields."""
    from hypothesis import strategies as st

    text = st.text(st.characters(exclude_categories=()), max_size=12)
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
    anything = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=10,
    )
    return text, anything


def test_any_json_in_the_agents_fields_parses_or_is_a_bad_request() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    text, anything = small_json()
    tool = st.fixed_dictionaries(
        {"type": st.just("function") | anything,
         "function": st.fixed_dictionaries(
             {"name": st.from_regex(r"[a-z_]{1,8}", fullmatch=True) | anything},
             optional={"parameters": anything, "strict": anything, "description": anything})}
    )  # fmt: skip
    call = st.fixed_dictionaries(
        {"id": text | anything,
         "function": st.fixed_dictionaries({"name": text, "arguments": text | anything})}
    )  # fmt: skip
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "tool"]) | anything},
        optional={"content": text | anything, "tool_calls": st.lists(call, max_size=2) | anything,
                  "tool_call_id": text | anything},
    )  # fmt: skip
    fields_ = {
        "tools": st.lists(tool, max_size=3) | anything,
        "tool_choice": st.sampled_from(["auto", "none", "required"]) | anything,
        "parallel_tool_calls": anything,
        "response_format": st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object", "json_schema"]) | anything},
            optional={"json_schema": st.fixed_dictionaries(
                {"name": text, "schema": anything}) | anything},
        ) | anything,
        "logprobs": anything, "top_logprobs": anything, "presence_penalty": anything,
        "frequency_penalty": anything, "logit_bias": anything, "modalities": anything,
        "audio": anything, "functions": anything,
    }  # fmt: skip
    body = st.fixed_dictionaries(
        {"model": st.just(DEMO_ID), "messages": st.lists(message, min_size=1, max_size=3)},
        optional=fields_,
    )

    @settings(max_examples=1000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(body)
    def check(body: dict[str, Any]) -> None:
        from cortex.api.openai import _parse

        try:
            _parse(parse_chat, stub_gateway(), body)
        except BadRequest as e:
            assert e.message and (e.param is None or isinstance(e.param, str))

    check()
