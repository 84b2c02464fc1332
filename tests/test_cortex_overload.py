"""Saying "not now": a real cortex over a real neuron that admits far fewer streams than asked.

The neuron generates for 2 requests at once and lets 2 wait; 16 clients stream at once through
cortex while another gateway's 2 go to the neuron directly. Every client gets a whole, correct
answer or a 503 with a Retry-After; nothing hangs, nothing dies, memory comes back. A request
waiting past cortex's queue timeout is dropped by the neuron before any token and answered 503.
A neuron that accepts TCP and never answers is failed over from after ``timeouts.accept``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
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
    endless,
    free_port,
    metric_value,
    neuron_config,
)

QUESTION = "What is the capital of France?"
PARIS = "The capital of France is Paris."
# Another gateway's requests take at most half the neuron's places, so cortex's get some.
CLIENTS, DIRECT, ROUNDS = 16, 2, 3
# Each client gives up after this; a request that outlives it has hung.
CLIENT_TIMEOUT = 120.0
RETRY_AFTER_MAX = 30
# RSS growth over the warmed-up baseline that still counts as "back near the baseline".
RSS_SLACK = 64 << 20


@pytest.fixture(scope="module")
async def small_neuron(
    demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NeuronProcess]:
    neuron = NeuronProcess(
        tmp_path_factory.mktemp("small-neuron"),
        # float32: greedy answers do not depend on the batch around them (bf16's rounding
        # changes with the batch's shape and can flip near-ties).
        neuron_config([demo_model(dtype="float32")], max_batch_size=2, max_waiting=2),
    ).start()
    try:
        await neuron.wait_serving()
        yield neuron
    finally:
        neuron.stop()


@contextlib.asynccontextmanager
async def running_cortex(
    workdir: Path,
    neurons: list[Any],
    names: list[str] | None = None,
    poll_interval: float = 0.5,
    **timeouts: float,
) -> AsyncIterator[CortexProcess]:
    """A cortex over ``neurons`` with these ``[timeouts]``, stopped at the end."""
    timeouts = {"retry_after": 2, "retry_after_max": RETRY_AFTER_MAX, **timeouts}
    config = cortex_config(neurons, names=names, poll_interval=poll_interval, timeouts=timeouts)
    # Polls may wait long: the poller must not mark a silent neuron down before a request
    # meets it (the accept timeout is what is tested).
    config["fleet"]["rpc_timeout"] = 30.0
    process = CortexProcess(workdir, config, models=[catalogue_model(DEMO_ID)]).start()
    try:
        await process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
async def cortex(
    small_neuron: NeuronProcess, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[CortexProcess]:
    async with running_cortex(tmp_path_factory.mktemp("cortex"), [small_neuron]) as process:
        yield process


def _body(content: str = QUESTION, **extra: Any) -> dict[str, Any]:
    return {
        "model": DEMO_ID,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        **extra,
    }


def _check_retry_later(status: int, headers: Any, raw: bytes) -> None:
    """A 503 (or a 429) in OpenAI's envelope with a Retry-After within its bounds."""
    assert status in (429, 503), (status, raw[:500])
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert 1 <= int(headers["Retry-After"]) <= RETRY_AFTER_MAX, headers


async def _stream(session: aiohttp.ClientSession, cortex: CortexProcess) -> str:
    """One streamed chat: "ok" for a whole correct answer, "later" for a 503 with Retry-After."""
    body = _body(max_tokens=8, stream=True)
    async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
        raw = await r.read()
        if r.status != 200:
            _check_retry_later(r.status, r.headers, raw)
            return "later"
    events = [e[len(b"data: ") :] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", raw[-500:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), raw[-500:]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert text and PARIS.startswith(text), text  # greedy: batching must not change it
    return "ok"


async def _direct(stub: pb_grpc.NeuronStub) -> str:
    """Another gateway's request, straight to the neuron: done, or refused at once."""
    try:
        text, last, _ = await collect(stub, chat(DEMO_ID, QUESTION, max_tokens=8, temperature=0))
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        return "later"
    assert PARIS.startswith(text) and last.finish_reason
    return "ok"


def _rss(process: NeuronProcess | CortexProcess) -> int:
    assert process.proc is not None
    for line in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _idle(stub: pb_grpc.NeuronStub) -> pb.ModelStatus:
    """The model once nothing runs or waits (fails the test if that never comes)."""
    deadline = time.monotonic() + 60
    while True:
        (model,) = (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models
        if model.in_flight == 0 and model.waiting == 0:
            return model
        assert time.monotonic() < deadline, f"requests left behind: {model}"
        await asyncio.sleep(0.1)


async def test_four_times_more_streams_than_admitted_get_answers_or_503_and_nothing_leaks(
    small_neuron: NeuronProcess, cortex: CortexProcess
) -> None:
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    outcomes: list[str] = []
    rss: list[tuple[int, int]] = []
    async with (
        grpc.aio.insecure_channel(small_neuron.endpoint) as channel,
        aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        stub = pb_grpc.NeuronStub(channel)
        for _ in range(1 + ROUNDS):  # the first round warms both processes up
            results = await asyncio.gather(
                *(_stream(session, cortex) for _ in range(CLIENTS)),
                *(_direct(stub) for _ in range(DIRECT)),
            )
            outcomes.extend(results[:CLIENTS])
            assert "ok" in results[:CLIENTS]
            model = await _idle(stub)
            assert small_neuron.proc is not None and small_neuron.proc.poll() is None
            assert cortex.proc is not None and cortex.proc.poll() is None
            rss.append((_rss(small_neuron), _rss(cortex)))
    mib = [(n >> 20, c >> 20) for n, c in rss]
    print(
        f"\noverload: {ROUNDS + 1} rounds of {CLIENTS} streams through cortex + {DIRECT} direct; "
        f"answered {outcomes.count('ok')}, 503 {outcomes.count('later')}, "
        f"other 0; RSS MiB (neuron, cortex) per round {mib}"
    )
    assert (model.max_batch_size, model.max_waiting) == (2, 2)
    assert outcomes.count("later") > 0, "the fleet was never saturated"
    baseline, last = rss[0], rss[-1]
    assert last[0] <= baseline[0] + RSS_SLACK, f"neuron RSS {rss}"
    assert last[1] <= baseline[1] + RSS_SLACK, f"cortex RSS {rss}"
    metrics = cortex.metrics()
    assert metric_value(metrics, "helexa_gateway_requests_total", status="500") == 0
    # Still serving, whole answers, once the load is gone.
    async with aiohttp.ClientSession(timeout=timeout) as session:
        assert await _stream(session, cortex) == "ok"


async def test_request_waiting_past_the_queue_timeout_is_a_503_before_any_token(
    small_neuron: NeuronProcess, tmp_path: Path
) -> None:
    expired = metric_value(
        small_neuron.metrics(), "helexa_neuron_requests_total", finish_reason="queue_timeout"
    )
    async with grpc.aio.insecure_channel(small_neuron.endpoint) as channel:
        stub = pb_grpc.NeuronStub(channel)
        # Another gateway's two long streams hold both batch slots; the queue has room.
        holders = [stub.Generate(endless(), timeout=300) for _ in range(2)]
        try:
            for call in holders:
                await call.read()
            async with (
                running_cortex(tmp_path, [small_neuron], queue=1.0) as cortex,
                aiohttp.ClientSession() as session,
                session.post(
                    cortex.url + "/v1/chat/completions", json=_body(max_tokens=8, stream=True)
                ) as r,
            ):
                raw = await r.read()
                _check_retry_later(r.status, r.headers, raw)
            assert "(queue_timeout)" in json.loads(raw)["error"]["message"]
            assert not any(call.done() for call in holders), "a holder ended and freed its slot"
            assert r.headers["Content-Type"].startswith("application/json")
            (model,) = (await stub.ListModels(pb.ListModelsRequest())).models
            assert model.waiting == 0, "the expired request was left in the queue"
        finally:
            for call in holders:
                call.cancel()
        await _idle(stub)
    now = metric_value(
        small_neuron.metrics(), "helexa_neuron_requests_total", finish_reason="queue_timeout"
    )
    assert now == expired + 1


async def _fill(stub: pb_grpc.NeuronStub) -> list[Any]:
    """Another gateway's 4 long streams: both batch slots and both waiting places taken."""
    calls = [stub.Generate(endless(), timeout=300) for _ in range(4)]
    deadline = time.monotonic() + 60
    while True:
        (model,) = (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models
        if (model.in_flight, model.waiting) == (2, 2):
            return calls
        assert time.monotonic() < deadline, (model, [c.done() for c in calls])
        await asyncio.sleep(0.05)


async def test_every_neuron_refusing_with_its_queue_full_is_a_503_with_retry_after(
    small_neuron: NeuronProcess, tmp_path: Path
) -> None:
    # Two entries for the one neuron (one through a forwarding listener); polls far apart, so
    # cortex believes both idle and learns otherwise only from their RESOURCE_EXHAUSTED.
    relay = await BlackHole(small_neuron.endpoint).start()
    try:
        async with (
            running_cortex(
                tmp_path, [relay, small_neuron], ["a", "b"], poll_interval=300
            ) as process,
            grpc.aio.insecure_channel(small_neuron.endpoint) as channel,
            aiohttp.ClientSession() as session,
        ):
            stub = pb_grpc.NeuronStub(channel)
            holders = await _fill(stub)
            try:
                async with session.post(
                    process.url + "/v1/chat/completions", json=_body(max_tokens=8, stream=True)
                ) as r:
                    raw = await r.read()
                    _check_retry_later(r.status, r.headers, raw)
            finally:
                for call in holders:
                    call.cancel()
            error = json.loads(raw)["error"]
            assert error["code"] == "no_capacity"
            assert "RESOURCE_EXHAUSTED" in error["message"] and "waiting" in error["message"]
            metrics = process.metrics()
            retries = metric_value(
                metrics, "helexa_gateway_retries_total", code="RESOURCE_EXHAUSTED"
            )
            assert retries == 2, "each neuron was tried once"
            await _idle(stub)
    finally:
        await relay.close()


class BlackHole:
    """A TCP listener that forwards to a real neuron until ``swallow()``; from then on it
    accepts connections and reads what they send, and never answers anything."""

    def __init__(self, target: str) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.endpoint = f"127.0.0.1:{free_port()}"
        self.swallowing = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> BlackHole:
        host, port = self.endpoint.rsplit(":", 1)
        self.server = await asyncio.start_server(self._accept, host, int(port))
        return self

    def swallow(self) -> None:
        self.swallowing.set()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.swallowing.is_set():
            self._spawn(self._pipe(reader, None))
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(self.host, self.port)
        self._spawn(self._pipe(reader, upstream_writer))
        self._spawn(self._pipe(upstream_reader, writer))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                if writer is not None and not self.swallowing.is_set():
                    writer.write(data)
                    await writer.drain()


async def test_neuron_that_accepts_and_never_answers_is_failed_over_after_accept_timeout(
    small_neuron: NeuronProcess, tmp_path: Path
) -> None:
    hole = await BlackHole(small_neuron.endpoint).start()
    # "a" (through the listener) sorts before "b" (direct): an even tie goes to "a" first.
    try:
        async with (
            running_cortex(tmp_path, [hole, small_neuron], ["a", "b"], accept=2.0) as process,
            aiohttp.ClientSession() as session,
        ):
            deadline = time.monotonic() + 30
            while True:  # until both are up
                async with session.get(process.url + "/ready") as r:
                    if (await r.json())["neurons_up"] == ["a", "b"]:
                        break
                assert time.monotonic() < deadline, process.log()
                await asyncio.sleep(0.1)
            hole.swallow()
            async with session.post(
                process.url + "/v1/chat/completions", json=_body(max_tokens=8)
            ) as r:
                assert r.status == 200, await r.text()
                reply = await r.json()
            assert PARIS.startswith(reply["choices"][0]["message"]["content"])
            metrics = process.metrics()
            retries = metric_value(
                metrics, "helexa_gateway_retries_total", code="DEADLINE_EXCEEDED"
            )
            assert retries == 1
            assert "did not take the request within 2 s" in process.log()
    finally:
        await hole.close()
