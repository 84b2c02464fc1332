"""cortex's OpenAI surface end to end: a real cortex process over a real neuron process.

The openai SDK (with ``max_retries=0``) talks to cortex unchanged, streaming and not; every
route answers through a real neuron; bad input gets OpenAI's error envelope and cortex keeps
serving; a client that goes away cancels the generation on the neuron.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.harness import (
    DEMO_ID,
    HARNESS_ADMIN_KEY,
    CortexProcess,
    NeuronProcess,
    catalogue_model,
    cortex_config,
    leave_stream_and_see_it_cancelled,
    metric_value,
    run_cli,
    until,
)

QUESTION = "What is the capital of France?"
PARIS = "The capital of France is Paris."


@pytest.fixture
def cortex(shared_cortex: CortexProcess) -> CortexProcess:
    return shared_cortex


def client(cortex: CortexProcess, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=cortex.api_url, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs
    )


async def test_openai_sdk_chat_whole_answers_paris_with_usage(cortex: CortexProcess) -> None:
    reply = await client(cortex).chat.completions.create(
        model=DEMO_ID,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=32,
    )
    assert reply.choices[0].message.content == PARIS
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == DEMO_ID
    assert reply.id.startswith("chatcmpl-")
    assert reply.created > 0
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 10
    assert 0 < reply.usage.completion_tokens <= 32
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_openai_sdk_chat_streamed_answers_paris_with_usage(cortex: CortexProcess) -> None:
    stream = await client(cortex).chat.completions.create(
        model="smol",  # an alias
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_completion_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, chunks = "", None, None, 0
    async for chunk in stream:
        chunks += 1
        assert chunk.model == DEMO_ID
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == PARIS
    assert finish == "stop"
    assert chunks > 2
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 10


async def test_openai_sdk_lists_and_retrieves_models(cortex: CortexProcess) -> None:
    models = await client(cortex).models.list()
    ids = [m.id for m in models.data]
    assert ids == [DEMO_ID], "each model once: the catalogue entry is also loaded on the neuron"
    model = await client(cortex).models.retrieve("smol")
    assert model.id == DEMO_ID
    with pytest.raises(openai.NotFoundError):
        await client(cortex).models.retrieve("no-such-model")


async def test_completions_through_a_real_neuron(cortex: CortexProcess) -> None:
    reply = await client(cortex).completions.create(
        model=DEMO_ID, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert "Paris" in reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens <= 5
    stream = await client(cortex).completions.create(
        model=DEMO_ID, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
    )
    streamed = "".join([c.choices[0].text async for c in stream if c.choices])
    assert streamed == reply.choices[0].text


async def test_health_and_ready(cortex: CortexProcess) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(cortex.url + "/health") as r:
            assert r.status == 200
        async with session.get(cortex.url + "/ready") as r:
            assert r.status == 200
            assert (await r.json())["neurons_up"] == ["n0"]


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": DEMO_ID, "messages": [{"role": "user", "content": "Hi"}], **extra}


BAD_INPUTS = [
    ("malformed-json", "/v1/chat/completions", b'{"model": "smollm2", "messages": [', 400, None),
    ("not-an-object", "/v1/chat/completions", [1, 2], 400, None),
    ("no-model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("unknown-model", "/v1/chat/completions", _chat(model="gpt-17"), 404, "model"),
    ("n-3", "/v1/chat/completions", _chat(n=3), 400, "n"),
    ("huge-max-tokens", "/v1/chat/completions", _chat(max_tokens=10**9), 400, "max_tokens"),
    ("zero-max-tokens", "/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-string", "/v1/chat/completions", _chat(max_tokens="10"), 400, "max_tokens"),
    ("temperature-string", "/v1/chat/completions", _chat(temperature="hot"), 400, "temperature"),
    ("temperature-high", "/v1/chat/completions", _chat(temperature=7), 400, "temperature"),
    ("top-p-zero", "/v1/chat/completions", _chat(top_p=0), 400, "top_p"),
    ("empty-messages", "/v1/chat/completions", _chat(messages=[]), 400, "messages"),
    ("messages-string", "/v1/chat/completions", _chat(messages="hi"), 400, "messages"),
    ("bad-role", "/v1/chat/completions", _chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
    ("stop-number", "/v1/chat/completions", _chat(stop=5), 400, "stop"),
    ("stream-string", "/v1/chat/completions", _chat(stream="yes"), 400, "stream"),
    ("image-part", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "messages[0].content"),
    ("completion-no-prompt", "/v1/completions", {"model": DEMO_ID}, 400, "prompt"),
    ("completion-n-2", "/v1/completions", {"model": DEMO_ID, "prompt": "x", "n": 2}, 400, "n"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS],
)
async def test_bad_input_is_an_openai_error_naming_the_field(
    cortex: CortexProcess, path: str, body: Any, status: int, param: str | None
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            cortex.url + path, data=data, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == status
            error = (await r.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_unknown_route_and_wrong_method_are_openai_errors(cortex: CortexProcess) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(cortex.url + "/v1/nothing") as r:
            assert r.status == 404
            assert "message" in (await r.json())["error"]
        async with session.get(cortex.url + "/v1/chat/completions") as r:
            assert r.status == 405
            assert "message" in (await r.json())["error"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_above_max_body_is_a_413_openai_error(
    cortex: CortexProcess, chunked: bool
) -> None:
    body = json.dumps(_chat(messages=[{"role": "user", "content": "x" * (2 << 20)}])).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]

    async with aiohttp.ClientSession() as session:
        async with session.post(
            cortex.url + "/v1/chat/completions",
            data=chunks() if chunked else body,
            headers={"Content-Type": "application/json"},
        ) as r:
            assert r.status == 413
            error = (await r.json())["error"]
    assert error["code"] == "request_too_large"
    assert error["type"] == "invalid_request_error"
    assert str(1 << 20) in error["message"]


@pytest.mark.parametrize(
    ("content", "max_tokens", "param", "named"),
    [
        ("word " * 9000, None, "messages", "the model's context is 8192 tokens"),
        ("word " * 5000, 4000, "max_tokens", "together more than the model's context of 8192"),
    ],
    ids=["prompt", "prompt-plus-max-tokens"],
)
async def test_prompt_beyond_the_context_is_a_400_naming_the_limit(
    cortex: CortexProcess, content: str, max_tokens: int | None, param: str, named: str
) -> None:
    body = _chat(messages=[{"role": "user", "content": content}], max_tokens=max_tokens)
    async with aiohttp.ClientSession() as session:
        async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 400
            error = (await r.json())["error"]
    assert named in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


async def test_openapi_lists_exactly_the_routes_cortex_serves(cortex: CortexProcess) -> None:
    from cortex.api import Gateway, build_app
    from cortex.auth import KeyRing
    from cortex.config import load
    from cortex.fleet import Fleet
    from cortex.neuronlink import read_links
    from cortex.router import Router

    async with aiohttp.ClientSession() as session:
        async with session.get(cortex.url + "/openapi.json") as r:
            assert r.status == 200
            document = await r.json()
    assert document["openapi"].startswith("3.")
    listed = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    # The routes of the app cortex builds from this very config.
    config, catalogue = load(cortex.config_path)
    fleet = Fleet(config, read_links(config))
    try:
        gateway = Gateway(config, catalogue, fleet, Router(config, fleet, catalogue))
        app = build_app(gateway, KeyRing(config.auth))
        served = {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None
        }
    finally:
        await fleet.close()
    assert listed == served
    # And each listed route answers there (not 404 or 405), with a body its schema allows.
    respond = {"model": DEMO_ID, "input": "Hi", "max_output_tokens": 1}
    bodies = {
        "/v1/chat/completions": _chat(max_tokens=1),
        "/v1/completions": {"model": DEMO_ID, "prompt": "Hi", "max_tokens": 1},
        "/v1/responses": respond,
        "/v1/messages": {
            "model": DEMO_ID,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "Hi"}],
        },
        "/v1/messages/count_tokens": {
            "model": DEMO_ID,
            "messages": [{"role": "user", "content": "Hi"}],
        },
    }
    async with aiohttp.ClientSession() as session:
        for method, path in sorted(listed):
            url = cortex.url + path.replace("{model}", DEMO_ID)
            if "{response_id}" in path:  # a kept response of its own (DELETE forgets it)
                async with session.post(cortex.url + "/v1/responses", json=respond) as r:
                    url = url.replace("{response_id}", (await r.json())["id"])
            if path.startswith("/admin/"):  # guarded: no admin key, no action
                url = url.replace("{neuron}", "n0")
                async with session.request(method, url) as r:
                    assert r.status == 401, (method, path, await r.text())
                    assert (await r.json())["error"]["code"] == "invalid_api_key"
                if method == "GET":  # the fleet view, with the harness's admin key
                    admin = {"Authorization": f"Bearer {HARNESS_ADMIN_KEY}"}
                    async with session.get(url, headers=admin) as r:
                        assert r.status == 200, (method, path, await r.text())
                continue
            async with session.request(method, url, json=bodies.get(path)) as r:
                assert r.status == 200, (method, path, await r.text())


async def test_cortex_keeps_serving_after_bad_input(cortex: CortexProcess) -> None:
    sdk = client(cortex)
    with pytest.raises(openai.BadRequestError) as error:
        await sdk.chat.completions.create(
            model=DEMO_ID, messages=[{"role": "user", "content": "x"}], n=3
        )
    assert error.value.param == "n"
    reply = await sdk.chat.completions.create(
        model=DEMO_ID, messages=[{"role": "user", "content": QUESTION}], temperature=0
    )
    assert reply.choices[0].message.content == PARIS


async def test_client_disconnect_mid_stream_cancels_generation_on_the_neuron(
    cortex: CortexProcess, shared_neuron: NeuronProcess
) -> None:
    body = _chat(
        messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        max_tokens=2000,
        temperature=0.7,
        seed=1,
        stream=True,
    )
    await leave_stream_and_see_it_cancelled(
        cortex, shared_neuron, "/v1/chat/completions", body, b"data: {"
    )


async def test_metrics_are_prefixed_histograms(cortex: CortexProcess) -> None:
    def counted(text: str) -> tuple[float, float, float]:
        """(chat completions answered 200, first tokens timed, durations timed) so far."""
        route = "/v1/chat/completions"
        return (
            metric_value(
                text, "helexa_gateway_requests_total", route=route, model=DEMO_ID, status="200"
            ),
            metric_value(text, "helexa_gateway_time_to_first_token_seconds_count", model=DEMO_ID),
            metric_value(
                text, "helexa_gateway_request_duration_seconds_count", route=route, model=DEMO_ID
            ),
        )

    before = counted(cortex.metrics())
    stream = await client(cortex).chat.completions.create(
        model=DEMO_ID, messages=[{"role": "user", "content": QUESTION}], max_tokens=4, stream=True
    )
    async for _ in stream:
        pass
    # This request's own counts (cortex counts it once the handler returns, after [DONE]).
    expected = tuple(n + 1 for n in before)
    await until(
        lambda: counted(cortex.metrics()) == expected,
        10,
        f"cortex never counted this request alone: {before} before, {expected} expected",
    )
    text = cortex.metrics()
    for name in (
        "helexa_gateway_time_to_first_token_seconds_bucket",
        "helexa_gateway_request_duration_seconds_bucket",
    ):
        assert name in text, name
    assert 'le="0.025"' in text  # our buckets, not the client's defaults alone
    assert metric_value(text, "helexa_gateway_neuron_up", neuron="n0") == 1
    assert metric_value(text, "helexa_gateway_models_loaded", neuron="n0") == 1


@pytest.mark.parametrize("how", ["cortex", "direct"])
def test_cortex_status_prints_the_fleet(cortex: CortexProcess, how: str) -> None:
    """By the running cortex's admin API (its key from the config), or polled from here."""
    direct = ["--direct"] if how == "direct" else []
    result = run_cli("cortex", "status", cortex.config_path, *direct)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["n0", "up"] and "cpu" in line for line in lines), lines
    assert any(DEMO_ID in line and "READY" in line and "pinned" in line for line in lines)
    # Only cortex knows its requests in flight and which neurons take requests.
    summary = "1 of 1 neurons up" + ("" if direct else ", 1 taking requests")
    assert lines[-1] == summary, lines
    assert any(line.startswith("n0") and "in_flight=0" in line for line in lines) != bool(direct)


def _loads(neuron: NeuronProcess) -> float:
    return metric_value(neuron.metrics(), "helexa_neuron_model_loads_total", model=DEMO_ID)


async def test_restarted_cortex_rebuilds_the_fleet_by_polling_and_serves_without_reloading(
    shared_neuron: NeuronProcess, tmp_path: Path
) -> None:
    loads = _loads(shared_neuron)
    process = CortexProcess(
        tmp_path, cortex_config([shared_neuron]), models=[catalogue_model(DEMO_ID)]
    )
    try:
        for _ in range(2):  # the same config, a new process: it knows only what it polls
            process.start()
            await process.wait_ready()
            reply = await client(process).chat.completions.create(
                model=DEMO_ID,
                messages=[{"role": "user", "content": QUESTION}],
                temperature=0,
                max_tokens=32,
            )
            assert reply.choices[0].message.content == PARIS
            assert "helexa_gateway_placements_total{" not in process.metrics()
            process.send(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait_exit, 60) == 0
    finally:
        process.stop()
    assert _loads(shared_neuron) == loads


async def test_sigterm_drains_in_flight_stream_then_exits_zero(
    shared_neuron: NeuronProcess, tmp_path: Path
) -> None:
    process = CortexProcess(
        tmp_path, cortex_config([shared_neuron]), models=[catalogue_model(DEMO_ID)]
    ).start()
    try:
        await process.wait_ready()
        body = _chat(
            messages=[{"role": "user", "content": "Write a story about a cat."}],
            max_tokens=48,
            temperature=0,
            stream=True,
        )
        async with aiohttp.ClientSession() as session:
            async with session.post(process.url + "/v1/chat/completions", json=body) as stream:
                assert stream.status == 200
                first = await stream.content.readline()
                assert first.startswith(b"data: ")
                process.send(signal.SIGTERM)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    async with session.get(process.url + "/ready") as r:
                        if r.status == 503:
                            break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("/ready never turned 503")
                async with session.post(process.url + "/v1/chat/completions", json=_chat()) as r:
                    assert r.status == 503
                    assert r.headers["Retry-After"].isdigit()
                    assert (await r.json())["error"]["code"] == "shutting_down"
                rest = await stream.content.read()
        events = [e for e in (first + rest).split(b"\n\n") if e.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        assert all(b'"error"' not in e for e in events)
        assert b'"finish_reason":"length"' in events[-2]
        assert await asyncio.to_thread(process.wait_exit, 60) == 0
        assert "drained" in process.log()
    finally:
        process.stop()


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_the_per_write_text_chunk_is_the_general_chunk(kind: str, include_usage: bool) -> None:
    from cortex.api.openai import Answer, Parsed
    from helexa.neuron.v1 import neuron_pb2 as pb

    answer = Answer(kind, Parsed("m", pb.GenerateRequest(), True, include_usage))
    for text in ["Paris", "", '"quoted" \\ back', "é 中 \u2028 \x00 😀", "\\0"]:
        assert answer.text_chunk(text) == answer.chunk(text, None), text


async def test_the_max_tokens_limit_also_bounds_a_request_that_leaves_it_out(
    shared_neuron: NeuronProcess, tmp_path: Path
) -> None:
    await shared_neuron.wait_serving()
    limited = CortexProcess(
        tmp_path,
        cortex_config([shared_neuron], limits={"max_tokens": 6}),
        models=[catalogue_model(DEMO_ID, pinned=True)],
    ).start()
    try:
        await limited.wait_ready()
        reply = await client(limited).chat.completions.create(
            model=DEMO_ID,
            messages=[{"role": "user", "content": "Count from 1 to 100, one number a line."}],
            temperature=0,
        )
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == 6
    finally:
        limited.stop()


async def test_client_strings_reach_the_log_and_the_error_cut_and_on_one_line(
    cortex: CortexProcess,
) -> None:
    name = "evil\nINJECTED fake log line\r" + "x" * 20_000
    async with aiohttp.ClientSession() as session:
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 404
            message = (await r.json())["error"]["message"]
    assert len(message) < 1100 and "more)" in message
    log = cortex.log()
    assert not any(line.startswith("INJECTED") for line in log.splitlines())
    line = next(line for line in log.splitlines() if "evil\\nINJECTED" in line)
    assert len(line) < 600
