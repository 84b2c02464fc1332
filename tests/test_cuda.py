"""The neuron on a CUDA device, with models built from published configs (random weights).

The tests marked ``cuda`` skip without a CUDA device; `make gpu-check` runs them on one. The
model builder they rely on is tested here on the CPU.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from neuron.sources import parameter_bytes
from tests.harness import NeuronProcess, chat, collect, neuron_config
from tests.random_models import BUILT, SHAPES, build, oversized, parameter_count

# Skipped without a CUDA device (tests/conftest.py), the one skip `make test` allows.
cuda = pytest.mark.cuda
MiB = 1 << 20
# What a neuron may still hold on the device once the model it unloaded is gone: allocator
# and library bookkeeping, not a model's weights or KV cache (the smallest here is ~0.8 GB).
MARGIN = 64 * MiB


def test_random_model_builds_and_generates_on_cpu(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build("tiny-llama", tmp_path / "tiny", dtype="float32", seed=3)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == SHAPES["tiny-llama"]["hidden_size"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert config["vocab_size"] == len(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert sum(p.numel() for p in model.parameters()) == parameter_count("tiny-llama")
    assert parameter_bytes(model_dir, None) == 4 * parameter_count("tiny-llama")
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt.input_ids.shape[1] + 8
    # The same seed draws the same weights: the CPU reference and the device copy agree.
    again = build("tiny-llama", tmp_path / "again", dtype="float32", seed=3)
    assert (again / "model.safetensors").read_bytes() == (
        model_dir / "model.safetensors"
    ).read_bytes()


def test_published_shapes_have_their_sizes() -> None:
    # With the demo tokenizer's 49,152 tokens in place of Qwen2.5's 151,936.
    assert 0.35e9 < parameter_count("qwen2.5-0.5b") < 0.5e9
    assert 1.3e9 < parameter_count("qwen2.5-1.5b") < 1.6e9


def test_oversized_model_declares_its_bytes_without_holding_them(tmp_path: Path) -> None:
    model_dir = oversized("tiny-llama", tmp_path / "huge", 200 << 30)
    assert parameter_bytes(model_dir, 2) >= 200 << 30
    assert (model_dir / "model.safetensors").stat().st_size < 4096


def _cuda_config(**extra: Any) -> dict[str, Any]:
    config = neuron_config(max_batch_size=8, loading={"local_dirs": [str(BUILT)]}, **extra)
    config["devices"] = {**config["devices"], "use": ["cuda:0"], "cuda_memory_reserve": "1GiB"}
    return config


def _spec(model_id: str, model_dir: Path, **extra: Any) -> pb.ModelSpec:
    return pb.ModelSpec(id=model_id, local=pb.LocalSource(path=str(model_dir)), **extra)


def _device_free() -> int:
    import torch

    torch.cuda.synchronize(0)
    return int(torch.cuda.mem_get_info(0)[0])


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    """The models these tests load, drawn on the GPU (reused from earlier runs)."""
    return {
        "qwen2.5-0.5b": build("qwen2.5-0.5b", device="cuda"),
        "tiny-llama": build("tiny-llama", dtype="float32"),
    }


async def _serving(tmp_path: Path, neurons: list[NeuronProcess], **devices: Any) -> NeuronProcess:
    config = _cuda_config()
    config["devices"].update(devices)
    neuron = NeuronProcess(tmp_path, config).start()
    neurons.append(neuron)
    await neuron.wait_serving()
    return neuron


async def _warm(stub: pb_grpc.NeuronStub, model_dir: Path) -> None:
    """Load, generate and unload once, so that what the neuron keeps for good (its CUDA
    context, library handles) is held before a baseline is read."""
    await stub.LoadModel(pb.LoadModelRequest(spec=_spec("warm", model_dir, device="cuda:0")))
    await collect(stub, chat("warm", "Hello", max_tokens=4, temperature=0))
    await stub.UnloadModel(pb.UnloadModelRequest(id="warm"))


@cuda
def test_cuda_device_is_discovered_with_its_memory() -> None:
    from neuron.config import DevicesConfig
    from neuron.devices import discover

    devices = discover(DevicesConfig(use=["auto"]))
    assert devices and all(d.kind == "cuda" for d in devices)
    assert all(d.total_bytes > 1 << 30 for d in devices)


@cuda
async def test_cuda_unload_returns_device_memory_to_its_baseline(
    built: dict[str, Path], tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    neuron = await _serving(tmp_path, neurons)
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        stub = pb_grpc.NeuronStub(channel)
        await _warm(stub, built["tiny-llama"])
        baseline = _device_free()
        spec = _spec("gpu", built["qwen2.5-0.5b"], device="cuda:0", max_context=2048)
        loaded = await stub.LoadModel(pb.LoadModelRequest(spec=spec))
        assert loaded.model.device == "cuda:0"
        assert baseline - _device_free() >= loaded.model.resident_bytes
        replies = await asyncio.gather(
            *(
                collect(stub, chat("gpu", f"Story {i}", max_tokens=16, temperature=0))
                for i in range(4)
            )
        )
        assert all(last.usage.completion_tokens > 0 for _, last, _ in replies)
        unloaded = await stub.UnloadModel(pb.UnloadModelRequest(id="gpu"))
        assert unloaded.was_loaded and unloaded.freed_bytes >= loaded.model.resident_bytes
        after = _device_free()
    assert baseline - after < MARGIN, f"{(baseline - after) / MiB:.0f} MiB not given back"


@cuda
async def test_two_models_are_resident_on_one_device(
    built: dict[str, Path], tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    neuron = await _serving(tmp_path, neurons)
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        stub = pb_grpc.NeuronStub(channel)
        before = _device_free()
        specs = [
            _spec("big", built["qwen2.5-0.5b"], device="cuda:0", max_context=2048),
            _spec("small", built["tiny-llama"], device="cuda:0", dtype="bfloat16"),
        ]
        loaded = [await stub.LoadModel(pb.LoadModelRequest(spec=s)) for s in specs]
        listed = (await stub.ListModels(pb.ListModelsRequest())).models
        assert sorted((m.id, m.device, m.state) for m in listed) == [
            ("big", "cuda:0", pb.MODEL_STATE_READY),
            ("small", "cuda:0", pb.MODEL_STATE_READY),
        ]
        assert before - _device_free() >= sum(r.model.resident_bytes for r in loaded)
        replies = await asyncio.gather(
            *(
                collect(stub, chat(m, "Hello", max_tokens=8, temperature=0))
                for m in ("big", "small")
            )
        )
        assert all(last.usage.completion_tokens > 0 for _, last, _ in replies)


@cuda
async def test_model_larger_than_free_memory_is_refused_before_it_allocates(
    built: dict[str, Path], tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    huge = oversized("qwen2.5-1.5b", BUILT / "oversized", total + (1 << 30))
    neuron = await _serving(tmp_path, neurons)
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        stub = pb_grpc.NeuronStub(channel)
        await _warm(stub, built["tiny-llama"])
        before = _device_free()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.LoadModel(pb.LoadModelRequest(spec=_spec("huge", huge, device="cuda:0")))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "does not fit" in (refused.value.details() or "")
        assert before - _device_free() < MARGIN


@cuda
async def test_cuda_greedy_decoding_equals_cpu_float32(
    built: dict[str, Path], tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    neuron = await _serving(tmp_path, neurons, use=["cpu", "cuda:0"])
    tiny = built["tiny-llama"]
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        stub = pb_grpc.NeuronStub(channel)
        for model_id, device in (("on-cpu", "cpu"), ("on-cuda", "cuda:0")):
            spec = _spec(model_id, tiny, device=device, dtype="float32")
            loaded = await stub.LoadModel(pb.LoadModelRequest(spec=spec))
            assert loaded.model.device == device
        for prompt in ("The capital of France is", "1, 2, 3,", "Once upon a time"):
            texts = []
            for model_id in ("on-cpu", "on-cuda"):
                request = pb.GenerateRequest(
                    model=model_id, prompt=prompt, max_tokens=32, temperature=0
                )
                text, last, _ = await collect(stub, request)
                assert last.usage.completion_tokens > 0
                texts.append(text)
            assert texts[0] == texts[1], prompt
