"""Loading, unloading, placement and cancellation on a real neuron process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from helexa.modelspec import ModelSpec
from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from neuron.errors import LoadFailed
from neuron.sources import materialise_gguf, resolve
from tests.harness import (
    DEMO_GGUF,
    DEMO_ID,
    SHARED_CACHE,
    NeuronProcess,
    chat,
    collect,
    demo_spec,
    endless,
    metric_value,
    neuron_config,
    read_rest,
    until,
)

LONG = "Write a very long story about a dragon who learns to cook."


async def test_two_concurrent_loads_of_one_id_load_it_once(
    shared_stub: pb_grpc.NeuronStub, shared_neuron: NeuronProcess
) -> None:
    spec = demo_spec("single-flight")
    a, b = await asyncio.gather(
        shared_stub.LoadModel(pb.LoadModelRequest(spec=spec)),
        shared_stub.LoadModel(pb.LoadModelRequest(spec=spec)),
    )
    assert a.model.state == b.model.state == pb.MODEL_STATE_READY
    again = await shared_stub.LoadModel(pb.LoadModelRequest(spec=spec))
    assert again.already_loaded
    metrics = shared_neuron.metrics()
    assert (
        metric_value(
            metrics, "helexa_neuron_model_loads_total", model="single-flight", result="loaded"
        )
        == 1
    )
    assert shared_neuron.log().count("model loaded model=single-flight ") == 1
    await shared_stub.UnloadModel(pb.UnloadModelRequest(id="single-flight"))


async def test_unload_waits_for_in_flight_request_then_frees_and_is_idempotent(
    shared_stub: pb_grpc.NeuronStub,
) -> None:
    spec = demo_spec("to-unload")
    free_before = (await shared_stub.Info(pb.InfoRequest())).devices[0].free_bytes
    loaded = await shared_stub.LoadModel(pb.LoadModelRequest(spec=spec))
    free_loaded = (await shared_stub.Info(pb.InfoRequest())).devices[0].free_bytes
    # The weights, and the KV cache of a full batch at the model's context.
    held = loaded.model.resident_bytes + loaded.model.kv_cache_bytes
    assert free_before - free_loaded == held
    assert loaded.model.kv_cache_bytes > 0

    call = shared_stub.Generate(chat("to-unload", LONG, max_tokens=40, temperature=0), timeout=300)
    await call.read()
    unload = asyncio.ensure_future(shared_stub.UnloadModel(pb.UnloadModelRequest(id="to-unload")))
    # While the stream runs the model is UNLOADING and takes no new requests.
    while True:
        models = {m.id: m for m in (await shared_stub.ListModels(pb.ListModelsRequest())).models}
        if models["to-unload"].state == pb.MODEL_STATE_UNLOADING:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(shared_stub, chat("to-unload", "Hi", max_tokens=4))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    _, last = await read_rest(call)
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 40
    reply = await unload
    assert reply.was_loaded
    models = (await shared_stub.ListModels(pb.ListModelsRequest())).models
    assert "to-unload" not in [m.id for m in models]
    assert (await shared_stub.Info(pb.InfoRequest())).devices[0].free_bytes == free_before
    assert not (await shared_stub.UnloadModel(pb.UnloadModelRequest(id="to-unload"))).was_loaded


async def test_cancelling_a_stream_frees_its_slot_for_the_next_request(
    shared_stub: pb_grpc.NeuronStub, shared_neuron: NeuronProcess
) -> None:
    # One slot: if the cancelled stream kept it, the next request would wait for 4000 tokens.
    await shared_stub.LoadModel(pb.LoadModelRequest(spec=demo_spec("one-slot", max_batch_size=1)))
    call = shared_stub.Generate(endless("one-slot"), timeout=300)
    await call.read()
    await call.read()
    call.cancel()
    text, _, _ = await collect(
        shared_stub,
        chat("one-slot", "What is the capital of France?", max_tokens=16, temperature=0),
    )
    assert "Paris" in text
    metrics = shared_neuron.metrics()
    assert (
        metric_value(
            metrics, "helexa_neuron_requests_total", model="one-slot", finish_reason="cancelled"
        )
        == 1
    )
    generated = metric_value(metrics, "helexa_neuron_generation_tokens_total", model="one-slot")
    assert generated < 200, f"the cancelled stream went on generating ({generated} tokens)"
    (model,) = [
        m
        for m in (await shared_stub.ListModels(pb.ListModelsRequest())).models
        if m.id == "one-slot"
    ]
    assert model.in_flight == 0 and model.waiting == 0
    await shared_stub.UnloadModel(pb.UnloadModelRequest(id="one-slot"))


async def test_a_models_own_queue_bound_and_queue_timeout_refuse_before_any_token(
    shared_stub: pb_grpc.NeuronStub, shared_neuron: NeuronProcess
) -> None:
    # One batch slot and one waiting place for this model (the neuron's default is 256).
    spec = demo_spec("one-wait", max_batch_size=1, max_waiting=1)
    await shared_stub.LoadModel(pb.LoadModelRequest(spec=spec))
    running = shared_stub.Generate(endless("one-wait"), timeout=300)
    await running.read()
    waiter = shared_stub.Generate(chat("one-wait", "Hi", max_tokens=4, queue_timeout=5.0))
    waited = asyncio.ensure_future(waiter.read())
    while True:  # until it is queued behind the running one
        models = (await shared_stub.ListModels(pb.ListModelsRequest())).models
        (model,) = [m for m in models if m.id == "one-wait"]
        if model.waiting == 1:
            break
        await asyncio.sleep(0.01)
    assert (model.max_batch_size, model.max_waiting) == (1, 1)
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await collect(shared_stub, chat("one-wait", "Hi", max_tokens=4))
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 requests waiting" in (full.value.details() or "")
    # Still waiting after its queue_timeout: dropped, the call fails with no message at all.
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await waited
    assert expired.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue_timeout" in (expired.value.details() or "")
    models = (await shared_stub.ListModels(pb.ListModelsRequest())).models
    (model,) = [m for m in models if m.id == "one-wait"]
    assert model.waiting == 0 and model.in_flight == 1
    metrics = shared_neuron.metrics()
    labels = {"model": "one-wait", "finish_reason": "queue_timeout"}
    assert metric_value(metrics, "helexa_neuron_requests_total", **labels) == 1
    running.cancel()
    await shared_stub.UnloadModel(pb.UnloadModelRequest(id="one-wait"))


@pytest.mark.parametrize(
    ("spec", "code", "named"),
    [
        (pb.ModelSpec(id="x"), grpc.StatusCode.INVALID_ARGUMENT, "spec.source"),
        (
            pb.ModelSpec(local=pb.LocalSource(path="/x")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "spec.id",
        ),
        (
            pb.ModelSpec(id="x", local=pb.LocalSource()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "spec.local.path",
        ),
        (demo_spec("x", dtype="int3"), grpc.StatusCode.INVALID_ARGUMENT, "spec.dtype"),
        (demo_spec("x", device="tpu"), grpc.StatusCode.INVALID_ARGUMENT, "spec.device"),
        (
            pb.ModelSpec(id="x", local=pb.LocalSource(path="/nonexistent/model")),
            grpc.StatusCode.PERMISSION_DENIED,
            "spec.path '/nonexistent/model': not under cache_dir or a directory in loading.local_dirs",
        ),
        (
            pb.ModelSpec(id="x", local=pb.LocalSource(path=str(DEMO_GGUF.parent / "absent.gguf"))),
            grpc.StatusCode.FAILED_PRECONDITION,
            "absent.gguf",
        ),
        (demo_spec(DEMO_ID, dtype="float16"), grpc.StatusCode.FAILED_PRECONDITION, "unload it"),
        (demo_spec("x", device="cuda:0"), grpc.StatusCode.RESOURCE_EXHAUSTED, "cuda:0"),
    ],
)
async def test_bad_load_requests_get_clear_statuses(
    shared_stub: pb_grpc.NeuronStub, spec: pb.ModelSpec, code: grpc.StatusCode, named: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await shared_stub.LoadModel(pb.LoadModelRequest(spec=spec))
    assert error.value.code() == code
    assert named in (error.value.details() or "")
    text, _, _ = await collect(
        shared_stub, chat(DEMO_ID, "What is the capital of France?", max_tokens=16, temperature=0)
    )
    assert "Paris" in text


async def test_no_room_and_a_full_queue_are_resource_exhausted(
    demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    # Room for one bf16 SmolLM2 (349 MB reserved to load), not two; one request may wait
    # beside the running one. bf16 asked for: "auto" is float32 on a CPU without native bf16;
    # one row of 256 tokens of KV cache (7 MB) is reserved beside the weights.
    neuron = NeuronProcess(
        tmp_path, neuron_config(cpu_memory_budget="400MiB", max_waiting=1)
    ).start()
    neurons.append(neuron)
    await neuron.wait_serving()
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        stub = pb_grpc.NeuronStub(channel)
        await stub.LoadModel(
            pb.LoadModelRequest(
                spec=demo_spec("a", max_batch_size=1, max_context=256, dtype="bfloat16")
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.LoadModel(
                pb.LoadModelRequest(
                    spec=demo_spec("b", max_batch_size=1, max_context=256, dtype="bfloat16")
                )
            )
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "does not fit" in (error.value.details() or "")

        running = stub.Generate(endless("a", max_tokens=200), timeout=300)
        await running.read()
        waiting = stub.Generate(
            chat("a", "What is the capital of France?", max_tokens=16, temperature=0)
        )
        while True:  # until the second request is queued behind the first
            models = {m.id: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
            model = models["a"]
            if model.waiting == 1:
                break
            await asyncio.sleep(0.01)
        assert model.in_flight == 1
        # The failed load stays listed with its error, for the gateway to see.
        assert models["b"].state == pb.MODEL_STATE_FAILED and "does not fit" in models["b"].error
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await collect(stub, chat("a", "Hi", max_tokens=4))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "waiting" in (error.value.details() or "")
        running.cancel()
        text, _ = await read_rest(waiting)
        assert "Paris" in text

        await stub.UnloadModel(pb.UnloadModelRequest(id="a"))
        reply = await stub.LoadModel(
            pb.LoadModelRequest(
                spec=demo_spec("b", max_batch_size=1, max_context=256, dtype="bfloat16")
            )
        )
        assert reply.model.state == pb.MODEL_STATE_READY


async def test_metrics_are_real_histograms_and_counters(
    shared_stub: pb_grpc.NeuronStub, shared_neuron: NeuronProcess
) -> None:
    def counted(text: str) -> tuple[float, float]:
        """(requests finished with stop or length, prompt tokens) so far."""
        finished = sum(
            metric_value(text, "helexa_neuron_requests_total", model=DEMO_ID, finish_reason=r)
            for r in ("stop", "length")
        )
        return finished, metric_value(text, "helexa_neuron_prompt_tokens_total", model=DEMO_ID)

    before = counted(shared_neuron.metrics())
    _, last, _ = await collect(
        shared_stub, chat(DEMO_ID, "Say hello.", max_tokens=8, temperature=0)
    )
    # This request's own counts, nothing more (a count a stray request fed would differ).
    expected = (before[0] + 1, before[1] + last.usage.prompt_tokens)
    await until(
        lambda: counted(shared_neuron.metrics()) == expected,
        10,
        f"the neuron never counted this request alone: {before} before, {expected} expected",
    )
    text = shared_neuron.metrics()
    for histogram in [
        "helexa_neuron_time_to_first_token_seconds",
        "helexa_neuron_inter_token_latency_seconds",
        "helexa_neuron_request_duration_seconds",
        "helexa_neuron_queue_seconds",
        "helexa_neuron_model_load_seconds",
        "helexa_neuron_prefill_batch_size",
    ]:
        assert f"# TYPE {histogram} histogram" in text
        assert f'{histogram}_bucket{{le="+Inf",model="{DEMO_ID}"}}' in text
    assert (
        metric_value(text, "helexa_neuron_model_resident_bytes", model=DEMO_ID, device="cpu") > 1e8
    )
    assert metric_value(text, "helexa_neuron_device_total_bytes", device="cpu") == 16 << 30
    assert "What is" not in text  # no prompt text in metrics


def test_gguf_is_materialised_once_and_reused(demo_dir: Path, shared_neuron: NeuronProcess) -> None:
    marker = demo_dir / ".complete"
    stamp = marker.stat().st_mtime_ns
    assert materialise_gguf(DEMO_GGUF, SHARED_CACHE) == demo_dir
    assert marker.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in demo_dir.iterdir() if p.suffix == ".safetensors") == [
        "int4.safetensors",  # the codes of the 4-bit projections (quant.find_int4)
        "int8.safetensors",  # the vocabulary projection's 8-bit codes (quant.codes8_of)
        "model.safetensors",
    ]
    assert "gguf materialised" not in shared_neuron.log()
    # On a CPU the demo's decode steps run in the kernel, its vocabulary projection 8-bit.
    assert "int4_projections=120 decode=kernel head=8-bit" in shared_neuron.log()


def _fake_hub_cache(cache: Path, repo: str, source: Path, commit: str = "a" * 40) -> None:
    """Lay out a Hugging Face hub cache for ``repo`` as huggingface_hub itself writes it."""
    folder = cache / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        if not file.name.startswith("."):
            (snapshot / file.name).symlink_to(file)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_hub_source_resolves_from_an_offline_cache(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_cache(tmp_path, "helexa-test/smollm2", demo_dir)
    for revision in ("", "main", "a" * 40):
        path = resolve(
            ModelSpec(id="m", hf_repo="helexa-test/smollm2", revision=revision), tmp_path
        )
        assert (path / "config.json").is_file()
        assert path.parent.name == "snapshots" or path.name == "a" * 40
    with pytest.raises(LoadFailed, match="helexa-test/absent"):
        resolve(ModelSpec(id="m", hf_repo="helexa-test/absent"), tmp_path)


async def test_neuron_loads_and_serves_a_hub_model_from_its_offline_cache(
    demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "helexa-test/smollm2", demo_dir)
    neuron = NeuronProcess(
        tmp_path / "n",
        neuron_config(
            [{"id": "hub-model", "hf_repo": "helexa-test/smollm2", "revision": "main"}],
            cache_dir=cache,
        ),
    ).start()
    neurons.append(neuron)
    await neuron.wait_serving()
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        text, _, _ = await collect(
            pb_grpc.NeuronStub(channel),
            chat("hub-model", "What is the capital of France?", max_tokens=16, temperature=0),
        )
    assert "Paris" in text


def test_neuron_info_prints_the_devices() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "neuron.cli", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.splitlines()[0].split() == ["DEVICE", "TOTAL", "FREE", "DESCRIPTION"]
    assert any(line.startswith("cpu ") for line in result.stdout.splitlines())


def test_local_directory_source_is_used_in_place(demo_dir: Path, tmp_path: Path) -> None:
    assert resolve(ModelSpec(id="m", path=str(demo_dir)), tmp_path) == demo_dir
    with pytest.raises(LoadFailed, match=r"no config\.json"):
        resolve(ModelSpec(id="m", path=str(tmp_path)), tmp_path)
