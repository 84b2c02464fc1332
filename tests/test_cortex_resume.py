"""Streams that survive their neuron: a generation whose neuron fails mid-way goes on on
another neuron from the text so far, and the client sees one whole answer.

Against scripted neurons (in-process gRPC servers that fail on cue and record the requests
they get) for the request the second neuron receives and what each surface's client sees;
against two real neurons with the demo model in float32 for a greedy stream whose neuron is
SIGKILLed mid-way, compared with the same request run uninterrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import (
    DEMO_ID,
    CortexProcess,
    NeuronProcess,
    catalogue_model,
    chat,
    collect,
    cortex_config,
    demo_model,
    metric_value,
    neuron_config,
)
from tests.test_cortex_streaming import Scripted, ScriptedNeuron

MODEL = "scripted"
STORY = "Write a long story about a dragon."
TIMEOUT = aiohttp.ClientTimeout(total=600)


@dataclass
class FailingNeuron(ScriptedNeuron):
    """A fresh request is answered "Hello", " there", then the generation fails by its cue
    (the last user message, or the prompt): "unavailable" ends it UNAVAILABLE (the neuron gone),
    "drain" with finish reason cancelled (a drain past its bound). A continuation is answered
    " world", "!" (stop), or refused before any token with ``refuse_continuations``. Every
    request is kept in ``requests``."""

    refuse_continuations: bool = False
    requests: list[pb.GenerateRequest] = field(default_factory=list)

    async def _generation(self, request: pb.GenerateRequest) -> AsyncGenerator[Any, None]:
        kept = pb.GenerateRequest()
        kept.CopyFrom(request)
        self.requests.append(kept)
        if request.continuation:
            if self.refuse_continuations:
                raise Scripted(grpc.StatusCode.UNAVAILABLE, "scripted: no room")
            # The continuation's tokens count in the prompt, as a neuron counts them.
            yield pb.GenerateResponse(text=" world", tokens=1, usage=pb.Usage(prompt_tokens=5))
            yield pb.GenerateResponse(
                text="!",
                tokens=1,
                finish_reason=pb.FINISH_REASON_STOP,
                usage=pb.Usage(prompt_tokens=5, completion_tokens=2, cached_prompt_tokens=5),
            )
            return
        cue = request.prompt or request.chat.messages[-1].content
        yield pb.GenerateResponse(
            text="Hello", tokens=1, usage=pb.Usage(prompt_tokens=3, cached_prompt_tokens=1)
        )
        await asyncio.sleep(0.3)  # so the first token has gone out to the client
        yield pb.GenerateResponse(text=" there", tokens=1)
        await asyncio.sleep(0.3)
        if cue == "drain":
            yield pb.GenerateResponse(
                finish_reason=pb.FINISH_REASON_CANCELLED,
                usage=pb.Usage(prompt_tokens=3, completion_tokens=2),
            )
            return
        raise Scripted(grpc.StatusCode.UNAVAILABLE, "scripted: the neuron is gone")


@contextlib.asynccontextmanager
async def scripted_fleet(
    tmp_path: Path, refuse_continuations: bool = False, **routing: Any
) -> AsyncIterator[tuple[CortexProcess, FailingNeuron, FailingNeuron]]:
    # "a" sorts first: a fresh request goes there (a tie, no prompt seen), and fails there.
    first = await FailingNeuron().start()
    second = await FailingNeuron(refuse_continuations=refuse_continuations).start()
    cortex = CortexProcess(
        tmp_path,
        cortex_config(
            [first, second],  # type: ignore[list-item]
            names=["a", "b"],
            timeouts={"keepalive": 0.2, "stall": 5.0},
            routing=routing,
        ),
    ).start()
    try:
        await cortex.wait_ready()
        yield cortex, first, second
    finally:
        cortex.stop()
        for neuron in (first, second):
            await neuron.server.stop(None)


def _events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON data of every SSE event (whatever the surface)."""
    events = []
    for event in raw.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data: {"):
                events.append(json.loads(line[len(b"data: ") :]))
    return events


def _text(events: list[dict[str, Any]]) -> str:
    """The answer's text as each surface streams it."""
    text = ""
    for body in events:
        for choice in body.get("choices") or []:
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        if body.get("type") == "content_block_delta":
            text += body["delta"].get("text", "")
        if body.get("type") == "response.output_text.delta":
            text += body["delta"]
    return text


def _finishes(events: list[dict[str, Any]]) -> list[str]:
    return [c["finish_reason"] for e in events for c in e.get("choices", []) if c["finish_reason"]]


def _errors(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "error" in e or e.get("type") == "error"]


async def _post(cortex: CortexProcess, path: str, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(cortex.url + path, json=body) as r:
            assert r.status == 200, await r.text()
            return await r.read()


def _chat(cue: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": cue}], **extra}


def _resumptions(cortex: CortexProcess, result: str) -> float:
    return metric_value(cortex.metrics(), "helexa_gateway_resumptions_total", result=result)


@pytest.mark.parametrize("cue", ["unavailable", "drain"])
async def test_a_stream_whose_neuron_fails_goes_on_on_another_from_the_text_so_far(
    tmp_path: Path, cue: str
) -> None:
    """The neuron gone (UNAVAILABLE) or draining past its bound (finish cancelled) after
    "Hello there": the other neuron gets the same conversation with that text as the open
    assistant turn, the max_tokens left and the same seed; the client gets one answer."""
    async with scripted_fleet(tmp_path) as (cortex, first, second):
        body = _chat(
            cue, stream=True, max_tokens=50, seed=7, temperature=0.8,
            stream_options={"include_usage": True},
        )  # fmt: skip
        events = _events(await _post(cortex, "/v1/chat/completions", body))
        assert not _errors(events), events
        assert _text(events) == "Hello there world!"
        assert _finishes(events) == ["stop"]
        # The prompt counted once (the first part's), the completion of both parts.
        assert events[-1]["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 1},
        }
        (original,) = first.requests
        (continued,) = second.requests
        assert not original.continuation
        assert [(m.role, m.content) for m in continued.chat.messages] == [("user", cue)]
        assert continued.continuation == "Hello there"
        assert continued.max_tokens == 48
        assert continued.seed == 7 and continued.temperature == pytest.approx(0.8)
        assert continued.request_id == original.request_id
        assert _resumptions(cortex, "resumed") == 1


async def test_a_whole_answer_whose_neuron_fails_is_resumed_too(tmp_path: Path) -> None:
    async with scripted_fleet(tmp_path) as (cortex, _, second):
        reply = json.loads(await _post(cortex, "/v1/chat/completions", _chat("x", max_tokens=9)))
    assert reply["choices"][0]["message"]["content"] == "Hello there world!"
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["prompt_tokens"] == 3 and reply["usage"]["completion_tokens"] == 4
    assert second.requests[0].max_tokens == 7


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 20, "stream": True}),
        ("/v1/messages", {**_chat("x"), "max_tokens": 20, "stream": True}),
        ("/v1/responses", {"model": MODEL, "input": "x", "max_output_tokens": 20, "stream": True}),
    ],
)
async def test_every_surface_resumes(tmp_path: Path, path: str, body: dict[str, Any]) -> None:
    """Completions (a raw prompt: the text goes on after it), Anthropic's Messages and the
    Responses API share the relay: each stream goes on with no error and no text twice."""
    async with scripted_fleet(tmp_path) as (cortex, _, second):
        events = _events(await _post(cortex, path, body))
    assert not _errors(events), events
    assert _text(events) == "Hello there world!"
    (continued,) = second.requests
    assert continued.continuation == "Hello there"
    assert continued.max_tokens == 18
    if path == "/v1/completions":
        assert continued.prompt == "Once"


async def test_with_the_switch_off_the_stream_ends_with_an_error_event(tmp_path: Path) -> None:
    async with scripted_fleet(tmp_path, resume_streams=False) as (cortex, _, second):
        raw = await _post(cortex, "/v1/chat/completions", _chat("x", stream=True))
        events = _events(raw)
        assert _text(events) == "Hello there"
        assert [e["error"]["code"] for e in _errors(events)] == ["neuron_failed"]
        assert raw.endswith(b"data: [DONE]\n\n")
        assert second.requests == []
        assert _resumptions(cortex, "not_resumable") == 1


async def test_a_constrained_answer_is_not_resumed(tmp_path: Path) -> None:
    """Text held to a JSON format cannot go on without its grammar replayed: an error event."""
    async with scripted_fleet(tmp_path) as (cortex, _, second):
        body = _chat("x", stream=True, response_format={"type": "json_object"})
        events = _events(await _post(cortex, "/v1/chat/completions", body))
        assert [e["error"]["code"] for e in _errors(events)] == ["neuron_failed"]
        assert second.requests == []


async def test_with_no_neuron_left_the_stream_ends_with_an_error_event(tmp_path: Path) -> None:
    async with scripted_fleet(tmp_path, refuse_continuations=True) as (cortex, _, second):
        raw = await _post(cortex, "/v1/chat/completions", _chat("x", stream=True))
        events = _events(raw)
        assert _text(events) == "Hello there"
        assert [e["error"]["code"] for e in _errors(events)] == ["neuron_failed"]
        assert _finishes(events) == []
        assert raw.endswith(b"data: [DONE]\n\n")
        assert [r.continuation for r in second.requests] == ["Hello there"]
        assert _resumptions(cortex, "failed") == 1


# ---- real neurons ----


@pytest.fixture(scope="module")
async def two_neurons(
    demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[CortexProcess, list[NeuronProcess]]]:
    """Shared by the tests below, in order: the last one kills a neuron."""
    tmp_path = tmp_path_factory.mktemp("resume")
    neurons = [
        NeuronProcess(tmp_path / name, neuron_config([demo_model(dtype="float32")])).start()
        for name in ("n0", "n1")
    ]
    cortex = None
    try:
        for neuron in neurons:
            await neuron.wait_serving()
        cortex = CortexProcess(
            tmp_path / "cortex", cortex_config(neurons), models=[catalogue_model(DEMO_ID)]
        ).start()
        await cortex.wait_ready()
        yield cortex, neurons
    finally:
        if cortex is not None:
            cortex.stop()
        for neuron in neurons:
            neuron.stop()


async def test_a_neuron_goes_on_from_a_continuation_as_it_would_have_gone_on(
    two_neurons: tuple[CortexProcess, list[NeuronProcess]],
) -> None:
    """Greedy, a chat's first 12 tokens and then its continuation for 20 more are the chat
    run for 32; a raw prompt's and a chat's with a frequency penalty likewise. The continuation's tokens count in the prompt: as
    many as were generated (the text tokenises back into the tokens that wrote it)."""
    _, (neuron, _) = two_neurons
    async with neuron.channel() as channel:
        stub = pb_grpc.NeuronStub(channel)
        for kind, base in (
            ("chat", chat(DEMO_ID, STORY, temperature=0)),
            ("prompt", pb.GenerateRequest(model=DEMO_ID, prompt="Once upon a time", temperature=0)),
            # The penalties count the continuation's tokens as the answer's own.
            ("penalised", chat(DEMO_ID, STORY, temperature=0, frequency_penalty=1.5)),
        ):
            whole, last, _ = await collect(stub, _with(base, max_tokens=32))
            begun, first, _ = await collect(stub, _with(base, max_tokens=12))
            rest, after, _ = await collect(stub, _with(base, max_tokens=20, continuation=begun))
            assert first.finish_reason == pb.FINISH_REASON_LENGTH, kind
            assert begun + rest == whole, kind
            assert after.usage.prompt_tokens == last.usage.prompt_tokens + 12, kind
            assert after.usage.completion_tokens + 12 == last.usage.completion_tokens, kind
        held = chat(DEMO_ID, STORY, continuation="{", output=pb.OutputConstraint(json_object=True))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stub, held)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith("continuation:")


def _with(request: pb.GenerateRequest, **fields: Any) -> pb.GenerateRequest:
    """A copy of ``request`` with ``fields`` set."""
    copy = pb.GenerateRequest()
    copy.CopyFrom(request)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


def _running(neuron: NeuronProcess) -> float:
    return metric_value(neuron.metrics(), "helexa_neuron_requests_running", model=DEMO_ID)


async def test_a_greedy_stream_whose_neuron_is_killed_ends_as_an_uninterrupted_one(
    two_neurons: tuple[CortexProcess, list[NeuronProcess]],
) -> None:
    """SIGKILL the neuron serving a greedy stream after its first tokens: the other neuron
    goes on from the text so far, and the client's text, finish and usage are those of the
    same request run to its end without a failure (float32: no rounding between the two)."""
    cortex, neurons = two_neurons
    body = {
        "model": DEMO_ID,
        "messages": [{"role": "user", "content": STORY}],
        "temperature": 0,
        "max_tokens": 96,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    whole = _events(await _post(cortex, "/v1/chat/completions", body))
    assert not _errors(whole)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            raw = b""
            while _text(_events(raw)).count(" ") < 8:  # some words in: well before its end
                line = await r.content.readline()
                assert line, raw
                raw += line
            (serving,) = [n for n in neurons if _running(n) == 1]
            serving.send(signal.SIGKILL)
            serving.wait_exit(30)
            raw += await r.read()
    events = _events(raw)
    assert not _errors(events), events[-3:]
    assert _resumptions(cortex, "resumed") == 1
    assert _text(events) == _text(whole)
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finishes == [
        c["finish_reason"] for e in whole for c in e["choices"] if c["finish_reason"]
    ]
    assert events[-1]["usage"]["prompt_tokens"] == whole[-1]["usage"]["prompt_tokens"]
    assert events[-1]["usage"]["completion_tokens"] == whole[-1]["usage"]["completion_tokens"]
