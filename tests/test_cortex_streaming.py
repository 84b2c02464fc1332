"""Streaming edge cases against scripted neurons: keep-alive while waiting, stall timeout,
retry on another neuron before the first token and never after it.

The neurons here are small grpc.aio servers in the test process that speak the real contract
and misbehave on cue (the real neuron never stalls on purpose); cortex is the real process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cortex.drain import MIN_COMPLETIONS
from cortex.multiplex import Multiplexer as CortexMultiplexer
from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from neuron.multiplex import Multiplexer
from tests.harness import (
    CortexProcess,
    cortex_config,
    free_port,
    metric_value,
    serving,
    until,
)

MODEL = "scripted"
BURST = 400
# 12.5 MiB in all: more than the kernel buffers between cortex and a client that is not
# reading hold (tcp_wmem's 4 MiB at most, the client's receive buffer fixed small).
BURST_TOKEN = "x" * 32768


@dataclass
class ScriptedNeuron(pb_grpc.NeuronServicer):
    """Generates by the user message: "delay" waits before its first token, "stall" stops
    after one, "midfail" fails after one, "burst" sends many at once, "tick" one every 20 ms for 3 s,
    "flood" 32 KiB tokens until cancelled, "spin" a small token every loop turn until cancelled,
    "poison" breaks the
    neuron (INTERNAL) before any; with ``refuse`` it fails before any."""

    refuse: bool = False
    max_message: int = 4 << 20  # gRPC's default; a real neuron takes 64 MiB
    endpoint: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    calls: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    server: Any = None

    async def start(self) -> ScriptedNeuron:
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", self.max_message)]
        )
        pb_grpc.add_NeuronServicer_to_server(self, self.server)
        checker = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checker, self.server)
        self.server.add_insecure_port(self.endpoint)
        await self.server.start()
        await checker.set("", health_pb2.HealthCheckResponse.SERVING)
        return self

    async def Info(self, request: Any, context: Any) -> pb.InfoResponse:
        device = pb.Device(
            kind=pb.DEVICE_KIND_CPU, name="cpu", total_bytes=1 << 30, free_bytes=1 << 29
        )
        return pb.InfoResponse(version="scripted", host="test", devices=[device])

    async def ListModels(self, request: Any, context: Any) -> pb.ListModelsResponse:
        status = pb.ModelStatus(id=MODEL, state=pb.MODEL_STATE_READY, device="cpu")
        return pb.ListModelsResponse(models=[status])

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[Any]:
        try:
            async for response in self._generation(request):
                yield response
        except Scripted as e:
            await context.abort(e.code, e.message)

    async def GenerateMany(self, requests: Any, context: Any) -> AsyncIterator[Any]:
        many = Multiplexer(self._generation, lambda e: (e.code, e.message))  # type: ignore[attr-defined]
        async for response in many.serve(requests, context):
            yield response

    async def _generation(self, request: pb.GenerateRequest) -> AsyncGenerator[Any, None]:
        cue = request.chat.messages[-1].content
        self.calls.append(cue)
        if self.refuse:
            raise Scripted(grpc.StatusCode.UNAVAILABLE, "scripted: refusing")
        try:
            if cue == "flood":  # 32 KiB tokens, every 10 ms, until cancelled
                while True:
                    yield pb.GenerateResponse(text=BURST_TOKEN, tokens=1)
                    await asyncio.sleep(0.01)
            if cue == "spin":  # as fast as the loop turns, until cancelled
                while True:
                    yield pb.GenerateResponse(text="s", tokens=1)
                    await asyncio.sleep(0)
            if cue == "tick":  # a token every 20 ms for 3 s
                for _ in range(150):
                    yield pb.GenerateResponse(text="t", tokens=1)
                    await asyncio.sleep(0.02)
            if cue == "poison":
                raise Scripted(grpc.StatusCode.INTERNAL, "scripted: this request breaks the model")
            if cue == "burst":
                for _ in range(BURST):
                    yield pb.GenerateResponse(text=BURST_TOKEN, tokens=1)
            if cue == "delay":
                await asyncio.sleep(1.0)
            yield pb.GenerateResponse(text="Hello", tokens=1)
            if cue == "stall":
                await asyncio.sleep(3600)
            if cue == "midfail":
                await asyncio.sleep(0.5)  # so the first token has gone out to the client
                raise Scripted(grpc.StatusCode.INTERNAL, "scripted: broke mid-stream")
            yield pb.GenerateResponse(
                text=" world",
                tokens=1,
                finish_reason=pb.FINISH_REASON_STOP,
                usage=pb.Usage(prompt_tokens=3, completion_tokens=2),
            )
        except asyncio.CancelledError:
            self.cancelled.append(cue)
            raise


def small_window(addr_info: Any) -> socket.socket:
    """A client socket whose receive buffer stays small: a client that stops reading soon
    fills what the kernel holds for it."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # fixed: never grows
    return sock


class Scripted(Exception):
    """A scripted failure: the status the call (or the generation's error event) ends with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[tuple[CortexProcess, list[ScriptedNeuron]]]:
    # "a" sorts first, so a tie sends every request to the refusing neuron first.
    neurons = [await ScriptedNeuron(refuse=True).start(), await ScriptedNeuron().start()]
    cortex = CortexProcess(
        tmp_path,
        cortex_config(
            neurons,  # type: ignore[arg-type]
            names=["a", "b"],
            timeouts={"keepalive": 0.2, "stall": 1.5},
        ),
    )
    async with in_front_of(cortex, neurons):
        yield cortex, neurons


@asynccontextmanager
async def in_front_of(
    cortex: CortexProcess, neurons: list[ScriptedNeuron]
) -> AsyncIterator[CortexProcess]:
    """``cortex`` started (and ready) in front of the started ``neurons``; all stopped at the
    end."""
    try:
        async with serving(cortex):
            yield cortex
    finally:
        for neuron in neurons:
            await neuron.server.stop(None)


async def _stream(cortex: CortexProcess, cue: str) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": cue}], "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            return await r.read()


def _text(raw: bytes) -> str:
    """The streamed text of an SSE body, whatever chunks it came in."""
    text = ""
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {"):
            body = json.loads(event[len(b"data: ") :])
            for choice in body.get("choices", []):
                text += choice["delta"].get("content") or ""
    return text


async def test_a_stream_counts_its_writes_and_tokens(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    """Tokens 20 ms apart go out a write each: the writes counted are the stream's own."""
    cortex, _ = scripted
    metrics = cortex.metrics()
    writes = metric_value(metrics, "helexa_gateway_stream_writes_total", model=MODEL)
    tokens = metric_value(metrics, "helexa_gateway_streamed_tokens_total", model=MODEL)
    raw = await _stream(cortex, "tick")
    assert _text(raw) == "t" * 150 + "Hello world"
    metrics = cortex.metrics()
    # 150 ticks, "Hello" and " world" (at once after it, so perhaps in one write with it).
    written = metric_value(metrics, "helexa_gateway_stream_writes_total", model=MODEL) - writes
    assert 151 <= written <= 152
    # The scripted usage: two completion tokens.
    assert metric_value(metrics, "helexa_gateway_streamed_tokens_total", model=MODEL) - tokens == 2


async def test_keepalive_comments_while_waiting_for_the_first_token(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    cortex, _ = scripted
    raw = await _stream(cortex, "delay")
    assert raw.startswith(b": keep-alive\n\n")
    assert _text(raw) == "Hello world"
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in raw


async def test_stalled_stream_ends_with_an_error_event_and_cancels_the_call(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    cortex, (_, good) = scripted
    raw = await _stream(cortex, "stall")
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert _text(raw) == "Hello"
    # Keep-alives every 0.2 s while no token comes after the first, until the 1.5 s stall.
    assert raw.split(b"Hello", 1)[1].count(b": keep-alive\n\n") >= 3
    assert b'"code":"stream_stalled"' in events[-2]
    assert events[-1] == b"data: [DONE]"
    deadline = asyncio.get_running_loop().time() + 10
    while "stall" not in good.cancelled:
        assert asyncio.get_running_loop().time() < deadline, "the neuron's call was not cancelled"
        await asyncio.sleep(0.05)


async def test_client_leaving_before_the_first_token_cancels_the_generation(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    cortex, (_, good) = scripted
    body = {"model": MODEL, "messages": [{"role": "user", "content": "delay"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
            assert await r.content.readline() == b": keep-alive\n"
    # Gone while the neuron was still before its first token (it waits 1 s).
    deadline = asyncio.get_running_loop().time() + 10
    while "delay" not in good.cancelled:
        assert asyncio.get_running_loop().time() < deadline, "the generation was not cancelled"
        await asyncio.sleep(0.05)
    assert good.calls == ["delay"]


async def test_clients_resetting_mid_stream_are_client_gone_not_server_errors(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    """Clients that reset their connections while tokens pour out (wrk at the end of a run,
    a killed agent): each is a client gone (499, its generation cancelled), never an
    unexpected error with a traceback and a 500, whichever comes first to cortex, the reset
    seen by a write or the handler's cancellation."""
    cortex, (_, good) = scripted
    host, port = cortex.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "spin"}], "stream": True}
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
        f"\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    clients = 32
    for _ in range(3):
        pairs = [await asyncio.open_connection(host, int(port)) for _ in range(clients)]
        for _, writer in pairs:
            writer.write(request)
        for reader, _ in pairs:
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            await reader.readexactly(4096)  # tokens are pouring
        for _, writer in pairs:  # all at once, with a reset (SO_LINGER 0), not a FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            writer.transport.abort()
    await until(
        lambda: good.cancelled.count("spin") == 3 * clients, 10, "generations not cancelled"
    )
    await until(
        lambda: (
            metric_value(cortex.metrics(), "helexa_gateway_requests_total", status="499")
            == 3 * clients
        ),
        10,
        f"not every reset counted as a client gone:\n{cortex.log()[-3000:]}",
    )
    assert "unexpected error" not in cortex.log()
    assert not metric_value(cortex.metrics(), "helexa_gateway_requests_total", status="500")


async def test_failure_before_first_token_is_retried_on_another_neuron(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    cortex, (refusing, good) = scripted
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            reply = await r.json()
    assert reply["choices"][0]["message"]["content"] == "Hello world"
    assert reply["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert refusing.calls == ["hi"] and good.calls == ["hi"]
    assert metric_value(cortex.metrics(), "helexa_gateway_retries_total", code="UNAVAILABLE") == 1


async def test_failure_after_first_token_with_no_neuron_to_go_on_is_an_error_event(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    """The stream would go on elsewhere (``[routing] resume_streams``), but the only other
    neuron refuses: the client gets the error event, and the failed neuron is not tried
    again."""
    cortex, (refusing, good) = scripted
    raw = await _stream(cortex, "midfail")
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert _text(raw) == "Hello"
    assert b'"code":"neuron_failed"' in events[-2]
    assert events[-1] == b"data: [DONE]"
    assert good.calls == ["midfail"], "never restarted where it failed"
    # Asked first (ties go to it by name) and refused; then asked to go on, and refused.
    assert refusing.calls == ["midfail", "midfail"], "the other neuron was asked to go on"


async def test_tokens_arriving_during_a_write_are_coalesced_into_one(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    """A client that reads slowly keeps cortex's writes in flight: what arrives meanwhile
    goes out in one write, not one event per token."""
    cortex, _ = scripted
    body = {"model": MODEL, "messages": [{"role": "user", "content": "burst"}], "stream": True}

    connector = aiohttp.TCPConnector(socket_factory=small_window)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            first = await r.content.readline()
            await asyncio.sleep(1.0)  # the burst arrives while this client is not reading
            raw = first + await r.read()
    events = [e for e in raw.split(b"\n\n") if b'"content":"x' in e]
    assert _text(raw) == BURST_TOKEN * BURST + "Hello world"
    assert len(events) < BURST / 2, f"{len(events)} events for {BURST} tokens: little coalesced"


async def _cortex_with_a_stalled_stream(
    tmp_path: Path, neuron: ScriptedNeuron, drain_timeout: float
) -> tuple[CortexProcess, aiohttp.ClientSession, aiohttp.ClientResponse]:
    """A cortex (stall bound far away) holding one stream that will not finish on its own."""
    cortex = CortexProcess(
        tmp_path,
        cortex_config(
            [neuron],  # type: ignore[list-item]
            drain_timeout=drain_timeout,
            timeouts={"stall": 600},
        ),
    ).start()
    await cortex.wait_ready()
    session = aiohttp.ClientSession()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "stall"}], "stream": True}
    response = await session.post(cortex.url + "/v1/chat/completions", json=body)
    assert response.status == 200
    while b'"content":"Hello"' not in await response.content.readline():
        pass
    return cortex, session, response


async def _wait_not_ready(cortex: CortexProcess, session: aiohttp.ClientSession) -> None:
    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        async with session.get(cortex.url + "/ready") as r:
            if r.status == 503:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("/ready never turned 503")


async def test_drain_timeout_cuts_a_stream_that_will_not_end_and_exits_zero(
    tmp_path: Path,
) -> None:
    neuron = await ScriptedNeuron().start()
    cortex, session, stream = await _cortex_with_a_stalled_stream(tmp_path, neuron, 1.0)
    try:
        cortex.send(signal.SIGTERM)
        await _wait_not_ready(cortex, session)
        # The cut stream ends with an error event and [DONE], not a bare close.
        rest = await asyncio.wait_for(stream.content.read(), 30)
        assert b'"code":"shutting_down"' in rest.replace(b" ", b""), rest
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert await asyncio.to_thread(cortex.wait_exit, 60) == 0
        assert "drain timeout passed" in cortex.log()
        deadline = asyncio.get_running_loop().time() + 10
        while "stall" not in neuron.cancelled:  # the cut stream's gRPC call was cancelled
            assert asyncio.get_running_loop().time() < deadline, cortex.log()
            await asyncio.sleep(0.05)
    finally:
        stream.close()
        await session.close()
        cortex.stop()
        await neuron.server.stop(None)


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    neuron = await ScriptedNeuron().start()
    cortex, session, stream = await _cortex_with_a_stalled_stream(tmp_path, neuron, 600.0)
    try:
        cortex.send(signal.SIGTERM)
        await _wait_not_ready(cortex, session)
        cortex.send(signal.SIGINT)
        assert await asyncio.to_thread(cortex.wait_exit, 30) == 1
        assert "second signal" in cortex.log()
    finally:
        stream.close()
        await session.close()
        cortex.stop()
        await neuron.server.stop(None)


async def test_a_request_that_breaks_neurons_is_tried_on_one_other_only(tmp_path: Path) -> None:
    neurons = [await ScriptedNeuron().start() for _ in range(3)]
    cortex = CortexProcess(
        tmp_path,
        cortex_config(neurons, names=["a", "b", "c"]),  # type: ignore[arg-type]
    ).start()
    try:
        await cortex.wait_ready()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "poison"}]}
        async with aiohttp.ClientSession() as session:
            async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 502, await r.text()
                assert "breaks the model" in (await r.json())["error"]["message"]
            body["messages"][0]["content"] = "hi"  # the fleet still serves
            async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
        # Its first neuron and one other, not the whole fleet.
        assert sum(n.calls.count("poison") for n in neurons) == 2
    finally:
        cortex.stop()
        for neuron in neurons:
            await neuron.server.stop(None)


async def _chat(session: aiohttp.ClientSession, cortex: CortexProcess, content: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
        await r.read()
        return r.status


@pytest.fixture
async def one_scripted(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[CortexProcess, ScriptedNeuron]]:
    neuron = await ScriptedNeuron(max_message=request.param).start()
    cortex = CortexProcess(
        tmp_path,
        cortex_config([neuron], limits={"max_body": 16 << 20}),  # type: ignore[list-item]
    ).start()
    try:
        await cortex.wait_ready()
        yield cortex, neuron
    finally:
        cortex.stop()
        await neuron.server.stop(None)


async def test_starts_queued_together_go_in_messages_the_neuron_takes() -> None:
    neuron = await ScriptedNeuron(max_message=64 << 20).start()  # as a real neuron
    try:
        async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
            many = CortexMultiplexer(pb_grpc.NeuronStub(channel))
            # Queued in one go (no await between): 72 MiB of starts before the writer runs.
            generations = [
                many.start(
                    pb.GenerateRequest(
                        model=MODEL,
                        chat=pb.ChatMessages(
                            messages=[pb.ChatMessage(role="user", content=str(i) * (1 << 20))]
                        ),
                    ),
                    60,
                )
                for i in range(72)
            ]
            loop = asyncio.get_running_loop()
            for generation in generations:
                await generation.started()
                while not any(m.finish_reason for m in generation.take()):
                    await generation.wait(loop.time() + 30)
            await many.close()
        assert not any(g.resent for g in generations)  # no call broke on the way
        assert len(neuron.calls) == 72
    finally:
        await neuron.server.stop(None)


def test_a_wait_while_an_alarm_already_past_is_pending_moves_it_under_uvloop() -> None:
    """cortex runs on uvloop, whose ``call_at`` of a time already past gives a plain Handle
    (no ``when``): a stream's next wait while such an alarm was still queued once failed the
    request with an AttributeError (a client's TimeoutError in the CI run that found it)."""
    import uvloop

    async def scenario() -> None:
        neuron = await ScriptedNeuron().start()
        try:
            async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
                many = CortexMultiplexer(pb_grpc.NeuronStub(channel))
                request = pb.GenerateRequest(
                    model=MODEL,
                    chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="delay")]),
                )
                generation = many.start(request, 60)
                loop = asyncio.get_running_loop()
                # A wait whose deadline has passed: its alarm is queued, not yet rung...
                early = asyncio.create_task(generation.wait(loop.time() - 1))
                await asyncio.sleep(0)
                assert not early.done()
                # ...when the next waits ask for a later deadline (a wait also returns, False,
                # when the neuron accepts the request).
                deadline = loop.time() + 30
                while not await generation.wait(deadline):
                    assert loop.time() < deadline
                assert generation.take()
                early.cancel()
                generation.cancel()
                await many.close()
        finally:
            await neuron.server.stop(None)

    uvloop.run(scenario())


@pytest.mark.parametrize("one_scripted", [4 << 20], indirect=True)
async def test_a_broken_call_fails_none_of_the_requests_that_had_no_token_yet(
    one_scripted: tuple[CortexProcess, ScriptedNeuron],
) -> None:
    cortex, neuron = one_scripted
    async with aiohttp.ClientSession() as session:
        waiting = [asyncio.create_task(_chat(session, cortex, "delay")) for _ in range(5)]
        await until(lambda: neuron.calls.count("delay") == 5, 30, "the requests never came")
        # 5 MiB alone: this neuron refuses the message and the call breaks under the others.
        too_big = await _chat(session, cortex, "x" * (5 << 20))
        statuses = await asyncio.gather(*waiting)
    assert too_big >= 500
    assert statuses == [200] * 5  # each sent again over a call of its own
    assert neuron.calls.count("delay") == 10


async def _open_stream(session: aiohttp.ClientSession, cortex: CortexProcess, cue: str) -> Any:
    body = {"model": MODEL, "messages": [{"role": "user", "content": cue}], "stream": True}
    response = await session.post(cortex.url + "/v1/chat/completions", json=body)
    assert response.status == 200
    await response.content.readuntil(b"\n\n")  # the first token: it is in flight
    return response


async def test_a_request_that_would_outwait_its_queue_timeout_is_refused_at_once(
    tmp_path: Path,
) -> None:
    neuron = await ScriptedNeuron().start()  # reports no batch slots: every request waits
    cortex = CortexProcess(
        tmp_path,
        cortex_config([neuron], timeouts={"queue": 2.0}),  # type: ignore[list-item]
    ).start()
    try:
        await cortex.wait_ready()
        async with aiohttp.ClientSession() as session:
            for _ in range(MIN_COMPLETIONS):  # a drain rate to measure
                assert await _chat(session, cortex, "hi") == 200
            # Streams that hold their slots: each one more queued, until the expected wait
            # (queued over the measured rate) passes timeouts.queue and the next is refused.
            held = []
            for _ in range(20):
                body = {"model": MODEL, "messages": [{"role": "user", "content": "stall"}]}
                body["stream"] = True
                r = await session.post(cortex.url + "/v1/chat/completions", json=body)
                if r.status != 200:
                    break
                await r.content.readuntil(b"\n\n")  # its first token: it is in flight
                held.append(r)
            assert r.status == 503, await r.text()
            assert int(r.headers["Retry-After"]) >= 1
            assert "timeouts.queue" in (await r.json())["error"]["message"]
            assert neuron.calls.count("stall") == len(held)  # the refused one never went
            for response in [*held, r]:
                response.close()
    finally:
        cortex.stop()
        await neuron.server.stop(None)


async def test_requests_past_max_concurrent_are_refused_with_retry_after(tmp_path: Path) -> None:
    neuron = await ScriptedNeuron().start()
    cortex = CortexProcess(
        tmp_path,
        cortex_config([neuron], limits={"max_concurrent": 2}),  # type: ignore[list-item]
    ).start()
    try:
        await cortex.wait_ready()
        async with aiohttp.ClientSession() as session:
            held = [await _open_stream(session, cortex, "stall") for _ in range(2)]
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 503
                assert "Retry-After" in r.headers
                assert "max_concurrent" in (await r.json())["error"]["message"]
            # Anthropic's surface calls it overload.
            messages = {**body, "max_tokens": 8}
            async with session.post(cortex.url + "/v1/messages", json=messages) as r:
                assert r.status == 529 and "Retry-After" in r.headers
                assert (await r.json())["error"]["type"] == "overloaded_error"
            assert "hi" not in neuron.calls  # refused, never sent
            for response in held:
                response.close()
            # Room again once cortex has seen them leave.
            deadline = asyncio.get_running_loop().time() + 10
            while await _chat(session, cortex, "hi") != 200:
                assert asyncio.get_running_loop().time() < deadline, "no room after they left"
                await asyncio.sleep(0.05)
    finally:
        cortex.stop()
        await neuron.server.stop(None)


async def test_a_client_that_stops_reading_is_dropped_and_its_generation_stops(
    tmp_path: Path,
) -> None:
    neuron = await ScriptedNeuron().start()
    cortex = CortexProcess(
        tmp_path,
        cortex_config([neuron], timeouts={"write": 1.0}),  # type: ignore[list-item]
    ).start()
    try:
        await cortex.wait_ready()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "flood"}], "stream": True}

        connector = aiohttp.TCPConnector(socket_factory=small_window)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.content.readline()
                # An endless answer of 3 MiB/s, soon more than the socket buffers hold, and
                # no more reads.
                await until(lambda: "flood" in neuron.cancelled, 30, "the generation went on")
                assert "stopped reading" in cortex.log()
    finally:
        cortex.stop()
        await neuron.server.stop(None)
