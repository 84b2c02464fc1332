"""Activation, drain and shutdown of a real neuron process: signals, health, exit codes."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import (
    DEMO_GGUF,
    DEMO_ID,
    Many,
    NeuronProcess,
    chat,
    collect,
    demo_model,
    endless,
    neuron_config,
    read_rest,
)

LONG = "Write a very long story about a dragon who learns to cook."


def start(tmp_path: Path, neurons: list[NeuronProcess], **config: object) -> NeuronProcess:
    neuron = NeuronProcess(tmp_path / f"neuron{len(neurons)}", neuron_config(**config)).start()  # type: ignore[arg-type]
    neurons.append(neuron)
    return neuron


async def _until_draining(channel: grpc.aio.Channel) -> None:
    """Wait for the neuron's health to turn NOT_SERVING."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != (
        health_pb2.HealthCheckResponse.NOT_SERVING
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_activation_continues_past_a_failing_default_model(
    demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    neuron = start(
        tmp_path,
        neurons,
        default_models=[{"id": "broken", "path": str(tmp_path / "missing.gguf")}, demo_model()],
        loading={"local_dirs": [str(tmp_path), str(DEMO_GGUF.parent)]},
    )
    await neuron.wait_serving()
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        models = {
            m.id: m
            for m in (await pb_grpc.NeuronStub(channel).ListModels(pb.ListModelsRequest())).models
        }
    assert models[DEMO_ID].state == pb.MODEL_STATE_READY
    assert models["broken"].state == pb.MODEL_STATE_FAILED
    assert "missing.gguf" in models["broken"].error
    log = neuron.log()
    assert "WARNING neuron.lifecycle: default model failed to load model=broken" in log
    assert f"default model ready model={DEMO_ID} seconds=" in log


async def test_empty_default_models_serve_with_nothing_loaded_and_no_warning(
    tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    neuron = start(tmp_path, neurons, default_models=[])
    await neuron.wait_serving()
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        reply = await pb_grpc.NeuronStub(channel).ListModels(pb.ListModelsRequest())
    assert list(reply.models) == []
    assert "WARNING" not in neuron.log()
    assert "ERROR" not in neuron.log()


async def test_health_is_serving_only_once_every_default_model_is_ready(
    demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    neuron = start(tmp_path, neurons, default_models=[demo_model("first"), demo_model("second")])
    deadline = time.monotonic() + 120
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.NeuronStub(channel)
        while True:
            assert time.monotonic() < deadline, neuron.log()
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
                continue
            # The first answer the neuron ever gives already finds both models READY.
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            models = (await stub.ListModels(pb.ListModelsRequest())).models
            assert {m.id: m.state for m in models} == {
                "first": pb.MODEL_STATE_READY,
                "second": pb.MODEL_STATE_READY,
            }
            break
    log = neuron.log()
    assert log.index("default model ready model=second") < log.index("neuron serving")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_in_flight_stream_then_unloads_and_exits_zero(
    demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess], signum: int
) -> None:
    neuron = start(tmp_path, neurons, default_models=[demo_model()], drain_timeout=60)
    await neuron.wait_serving()
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        stub = pb_grpc.NeuronStub(channel)
        call = stub.Generate(chat(DEMO_ID, LONG, max_tokens=80, temperature=0), timeout=300)
        text = (await call.read()).text
        neuron.send(signum)
        # Draining: health turns NOT_SERVING and new work is refused while the stream runs.
        await _until_draining(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stub, chat(DEMO_ID, "Hi", max_tokens=4))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        rest, last = await read_rest(call)
        text += rest
    assert last is not None and last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 80
    assert len(text) > 100
    assert neuron.wait_exit(within=60) == 0
    log = neuron.log()
    assert f"model unloaded model={DEMO_ID}" in log
    assert log.index("drained") < log.index(f"model unloaded model={DEMO_ID}")
    assert "neuron stopped" in log


async def test_signal_lets_generate_many_generations_finish_then_ends_the_call(
    demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    neuron = start(tmp_path, neurons, default_models=[demo_model()], drain_timeout=60)
    await neuron.wait_serving()
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        many = Many(pb_grpc.NeuronStub(channel))
        await many.start({1: chat(DEMO_ID, LONG, max_tokens=150, temperature=0)})
        await many.read_until(lambda: many.responded(1))
        neuron.send(signal.SIGTERM)
        await _until_draining(channel)
        await many.start({2: chat(DEMO_ID, "Hi", max_tokens=4)})
        await many.read_until(lambda: many.over(1) and many.over(2))
        # The neuron ends the call itself, OK, once its generation is done.
        assert await many.call.read() is grpc.aio.EOF
        assert await many.call.code() == grpc.StatusCode.OK
    last = many.events[1][-1].response
    assert (last.finish_reason, last.usage.completion_tokens) == (pb.FINISH_REASON_LENGTH, 150)
    _, refused = many.events[2]
    assert refused.error.code == grpc.StatusCode.UNAVAILABLE.value[0], refused
    assert neuron.wait_exit(within=30) == 0
    log = neuron.log()
    assert log.index("drained") < log.index("neuron stopped")


async def test_stream_longer_than_drain_timeout_ends_cancelled_and_exit_is_bounded(
    demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    drain = 2.0
    neuron = start(tmp_path, neurons, default_models=[demo_model()], drain_timeout=drain)
    await neuron.wait_serving()
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        call = pb_grpc.NeuronStub(channel).Generate(endless(max_tokens=5000), timeout=300)
        await call.read()
        neuron.send(signal.SIGTERM)
        _, last = await read_rest(call)
    # Bounded by the drain timeout, not by the stream: it was cut (cancelled, short of its
    # 5,000 tokens) and the exit followed. (wait_exit's bound only stops a hang.)
    assert last is not None and last.finish_reason == pb.FINISH_REASON_CANCELLED
    assert 0 < last.usage.completion_tokens < 5000
    assert neuron.wait_exit(within=drain + 60) == 0
    log = neuron.log()
    assert log.index("drain timeout passed, cancelling in_flight=1") < log.index("neuron stopped")


async def test_second_signal_exits_at_once(
    demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    neuron = start(tmp_path, neurons, default_models=[demo_model()], drain_timeout=300)
    await neuron.wait_serving()
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        call = pb_grpc.NeuronStub(channel).Generate(endless(max_tokens=5000), timeout=300)
        await call.read()
        neuron.send(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "draining in_flight=1" not in neuron.log():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        neuron.send(signal.SIGTERM)
        # Well before the 300 s drain bound: the second signal does not wait for the stream.
        assert neuron.wait_exit(within=30) == 1
        call.cancel()
    assert "second signal, exiting at once" in neuron.log()


async def test_example_config_plus_a_default_model_serves_and_shuts_down(
    demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    # The shipped example, as an operator would use it: only the ports, the cache and one
    # default model (and the directory it may be loaded from) differ (the example's own ports
    # may be taken on a test machine).
    from helexa.configfile import load_toml
    from tests.harness import ROOT

    config = load_toml(ROOT / "configs/neuron.example.toml")
    fresh = neuron_config()
    config.update(
        listen=fresh["listen"],
        metrics_listen=fresh["metrics_listen"],
        cache_dir=fresh["cache_dir"],
        default_models=[demo_model()],
        loading={**config.get("loading", {}), "local_dirs": fresh["loading"]["local_dirs"]},
    )
    neuron = NeuronProcess(tmp_path / "example", config).start()
    neurons.append(neuron)
    await neuron.wait_serving()
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        text, last, _ = await collect(
            pb_grpc.NeuronStub(channel),
            chat(DEMO_ID, "What is the capital of France?", max_tokens=16, temperature=0),
        )
    assert "Paris" in text and last.finish_reason == pb.FINISH_REASON_STOP
    neuron.send(signal.SIGTERM)
    assert neuron.wait_exit(within=60) == 0
    assert f"model unloaded model={DEMO_ID}" in neuron.log()
