"""Placement and eviction end to end: a real cortex over one neuron with a small memory budget.

Each bf16 copy of the demo model takes 380,647,296 bytes on the neuron (its dense weights, and
for the CPU decode kernel the codes of its 4-bit projections and of its 8-bit vocabulary
projection; the neuron reserves 380,506,752 to load one, and 12,165,120 for its KV cache); a
1200MiB budget holds three copies (under different ids), not four. Requests for catalogue models that are not
loaded place them; with no room the least recently used unpinned idle model is unloaded first;
the pinned one never is, even when it is the least recently used. The copies ask for bf16:
"auto" is float32 on a CPU without native bf16, and three of those do not fit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import (
    DEMO_GGUF,
    CortexProcess,
    NeuronProcess,
    catalogue_model,
    cortex_config,
    metric_value,
    neuron_config,
    serving,
)

# bf16, and a KV cache of 2 rows of 256 tokens (15 MB) reserved beside the weights.
SMALL = {"dtype": "bfloat16", "max_batch_size": 2, "max_context": 256}


@pytest.fixture
async def small_fleet(
    demo_dir: Path, tmp_path: Path, neurons: list[NeuronProcess]
) -> AsyncIterator[tuple[CortexProcess, NeuronProcess]]:
    neuron = NeuronProcess(tmp_path / "neuron", neuron_config(cpu_memory_budget="1200MiB"))
    neurons.append(neuron.start())
    await neuron.wait_serving()
    cortex = CortexProcess(
        tmp_path / "cortex",
        cortex_config([neuron]),
        models=[
            catalogue_model("pinned", pinned=True, **SMALL),
            catalogue_model("x", **SMALL),
            catalogue_model("y", **SMALL),
            catalogue_model("z", **SMALL),
            catalogue_model("huge", memory="100GiB"),
            {"id": "broken", "path": str(DEMO_GGUF.parent / "missing.gguf"), "memory": "1MiB"},
            {"id": "forbidden", "path": "/nonexistent/model.gguf", "memory": "1MiB"},
        ],
    )
    async with serving(cortex):
        yield cortex, neuron


async def _ask(cortex: CortexProcess, model: str) -> None:
    sdk = openai.AsyncOpenAI(base_url=cortex.api_url, api_key="unused", max_retries=0)
    reply = await sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert reply.model == model


async def _held(neuron: NeuronProcess) -> set[str]:
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        reply = await pb_grpc.NeuronStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    return {m.id for m in reply.models}


async def test_placement_evicts_least_recently_used_unpinned_idle_model(
    small_fleet: tuple[CortexProcess, NeuronProcess],
) -> None:
    cortex, neuron = small_fleet
    assert await _held(neuron) == set()
    # Each request for an unloaded catalogue model places it.
    for model in ("pinned", "x", "y"):
        await _ask(cortex, model)
    assert await _held(neuron) == {"pinned", "x", "y"}
    await _ask(cortex, "x")  # now y is the least recently used unpinned model; pinned is older
    await _ask(cortex, "z")  # no room for a fourth: y goes, not the pinned one
    assert await _held(neuron) == {"pinned", "x", "z"}
    text = cortex.metrics()
    assert metric_value(text, "helexa_gateway_evictions_total", model="y", neuron="n0") == 1
    assert metric_value(text, "helexa_gateway_evictions_total", model="pinned") == 0

    # Concurrent requests for an unloaded model share one placement (which evicts x, the LRU).
    await asyncio.gather(*(_ask(cortex, "y") for _ in range(3)))
    assert await _held(neuron) == {"pinned", "z", "y"}
    text = cortex.metrics()
    assert metric_value(text, "helexa_gateway_placements_total", model="y", result="loaded") == 2
    assert metric_value(text, "helexa_gateway_evictions_total", model="x", neuron="n0") == 1
    assert metric_value(text, "helexa_gateway_evictions_total", model="pinned") == 0
    assert metric_value(text, "helexa_gateway_placement_seconds_count", model="y") == 2

    # A model no neuron can ever hold: 503 with Retry-After, and nothing was evicted for it.
    async with aiohttp.ClientSession() as session:
        body = {"model": "huge", "messages": [{"role": "user", "content": "Hi"}]}
        async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 503
            assert r.headers["Retry-After"].isdigit()
            assert (await r.json())["error"]["code"] == "no_capacity"
    assert await _held(neuron) == {"pinned", "z", "y"}

    # A load the neuron fails (no such file where it may read): 502 naming the neuron's reason;
    # a source outside the neuron's [loading] policy: 403 (its PERMISSION_DENIED).
    refusals = [
        ("broken", 502, "neuron_failed", "missing.gguf"),
        ("forbidden", 403, "model_not_permitted", "/nonexistent/model.gguf"),
    ]
    async with aiohttp.ClientSession() as session:
        for model, status, code, named in refusals:
            body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
            async with session.post(cortex.url + "/v1/chat/completions", json=body) as r:
                assert r.status == status, model
                error = (await r.json())["error"]
                assert error["code"] == code and named in error["message"]
