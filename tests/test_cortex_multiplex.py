"""cortex's generations share one GenerateMany call per neuron: many concurrent requests, each
answered with its own generation, and a call that breaks is opened again."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

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
    neuron_config,
)

TIMEOUT = aiohttp.ClientTimeout(total=180)
QUESTIONS = [f"What is {n} plus {n}?" for n in range(1, 13)]


@pytest.fixture(scope="module")
async def neuron(
    demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NeuronProcess]:
    # float32: a greedy answer does not depend on the batch around it.
    config = neuron_config([demo_model(dtype="float32")], max_batch_size=8)
    process = NeuronProcess(tmp_path_factory.mktemp("mux-neuron"), config).start()
    try:
        await process.wait_serving()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
async def cortex(
    neuron: NeuronProcess, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[CortexProcess]:
    config = cortex_config([neuron], poll_interval=0.5)
    process = CortexProcess(
        tmp_path_factory.mktemp("mux-cortex"), config, models=[catalogue_model(DEMO_ID)]
    ).start()
    try:
        await process.wait_ready()
        yield process
    finally:
        process.stop()


def _body(question: str, stream: bool) -> dict[str, Any]:
    return {
        "model": DEMO_ID,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 10,
        "temperature": 0,
        "stream": stream,
    }


async def _ask(session: aiohttp.ClientSession, url: str, question: str, stream: bool) -> str:
    async with session.post(url, json=_body(question, stream)) as r:
        assert r.status == 200, await r.text()
        if not stream:
            return str((await r.json())["choices"][0]["message"]["content"])
        text = []
        async for line in r.content:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text.append(choice["delta"].get("content") or "")
        return "".join(text)


async def test_concurrent_requests_each_get_their_own_answer(
    cortex: CortexProcess, neuron: NeuronProcess
) -> None:
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        stub = pb_grpc.NeuronStub(channel)
        alone = [
            (await collect(stub, chat(DEMO_ID, q, max_tokens=10, temperature=0)))[0]
            for q in QUESTIONS
        ]
    assert len(set(alone)) > len(QUESTIONS) // 2, alone  # the answers tell requests apart
    url = cortex.url + "/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        answers = await asyncio.gather(
            *(_ask(session, url, q, stream=i % 2 == 0) for i, q in enumerate(QUESTIONS))
        )
    assert answers == alone


async def test_a_neuron_restarted_under_cortex_gets_a_new_call_and_serves(
    cortex: CortexProcess, neuron: NeuronProcess
) -> None:
    url = cortex.url + "/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        assert await _ask(session, url, QUESTIONS[0], stream=False)
        neuron.stop()  # ends cortex's GenerateMany call to it
        neuron.start()
        await neuron.wait_serving()
        deadline = asyncio.get_running_loop().time() + 60
        while True:  # until the channel has reconnected (a 503 until then)
            async with session.post(url, json=_body(QUESTIONS[0], False)) as r:
                if r.status == 200:
                    break
                assert r.status == 503, await r.text()
            assert asyncio.get_running_loop().time() < deadline, cortex.log()
            await asyncio.sleep(0.1)
        answers = await asyncio.gather(
            *(_ask(session, url, q, stream=False) for q in QUESTIONS[:4])
        )
    assert all(answers)
