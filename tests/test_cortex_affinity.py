"""Cache-aware routing: a conversation's next turn goes where its beginning was served, unless
that neuron is too busy; ``policy = "least_loaded"`` turns it off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cortex.affinity import BLOCK, PrefixIndex, prefix_keys
from helexa.neuron.v1 import neuron_pb2 as pb
from tests.harness import CortexProcess, cortex_config, metric_value
from tests.test_cortex_streaming import MODEL, ScriptedNeuron


def _chat(*contents: str, model: str = "m") -> pb.GenerateRequest:
    roles = ["system", "user", "assistant"]
    messages = [
        pb.ChatMessage(role=roles[min(i, 1) if i < 2 else 1 + i % 2], content=c)
        for i, c in enumerate(contents)
    ]
    return pb.GenerateRequest(model=model, chat=pb.ChatMessages(messages=messages))


def test_a_prompts_keys_are_its_beginnings_and_the_longest_known_names_the_neuron() -> None:
    system = "You are a careful agent. " * 40  # 1,000 characters: four blocks
    first = prefix_keys(_chat(system, "Fix the bug in parse()."))
    assert len(first) == -(-len(system) // BLOCK) + 1
    later = prefix_keys(_chat(system, "Fix the bug in parse().", "Done.", "Now add a test."))
    assert later[: len(first)] == first  # the next turn begins as the first did
    other = prefix_keys(_chat(system, "Write a poem."))
    assert other[:-1] == first[:-1] and other[-1] != first[-1]  # the same system prompt only
    assert prefix_keys(_chat(system, "Fix the bug in parse().", model="other"))[0] != first[0]

    index = PrefixIndex(entries=1000)
    index.served(first, "a")
    index.served(other, "b")  # the system prompt's blocks now last served by b
    assert index.holder(later, {"a", "b"}) == ("a", len(first))
    assert index.holder(later, {"b"}) == ("b", len(first) - 1)  # a is not a candidate
    assert index.holder(prefix_keys(_chat("Hello")), {"a", "b"}) is None


def test_the_index_is_bounded_and_forgets_the_least_recently_used() -> None:
    index = PrefixIndex(entries=4)
    old = prefix_keys(_chat("x" * (3 * BLOCK)))  # 3 keys
    new = prefix_keys(_chat("y" * (3 * BLOCK)))
    index.served(old, "a")
    index.served(new, "b")
    assert len(index) == 4
    assert index.holder(new, {"a", "b"}) == ("b", 3)
    # old's shortest beginnings went first; its whole one, the latest it wrote, is still there
    assert index.holder(old[:2], {"a", "b"}) is None
    assert index.holder(old, {"a", "b"}) == ("a", 3)
    index.served(prefix_keys(_chat("z")), "b")
    assert index.holder(old, {"a", "b"}) is None


@pytest.fixture(params=["cache_aware", "least_loaded"])
async def fleet(
    request: Any, tmp_path: Path
) -> AsyncIterator[tuple[CortexProcess, list[ScriptedNeuron], str]]:
    neurons = [await ScriptedNeuron().start(), await ScriptedNeuron().start()]
    cortex = CortexProcess(
        tmp_path,
        cortex_config(
            neurons,  # type: ignore[arg-type]
            names=["a", "b"],
            routing={"policy": request.param, "balance_margin": 2},
        ),
    ).start()
    try:
        await cortex.wait_ready()
        yield cortex, neurons, request.param
    finally:
        cortex.stop()
        for neuron in neurons:
            await neuron.server.stop(None)


def _body(turns: list[str], stream: bool = False) -> dict[str, Any]:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"model": MODEL, "messages": messages, "stream": stream}


async def _open(session: aiohttp.ClientSession, cortex: CortexProcess, turns: list[str]) -> Any:
    """A stream that holds its neuron: its last turn is "stall" (the neuron stalls after one
    token)."""
    assert turns[-1] == "stall"
    r = await session.post(cortex.url + "/v1/chat/completions", json=_body(turns, True))
    assert r.status == 200
    await r.content.readuntil(b"\n\n")
    return r


async def _ask(session: aiohttp.ClientSession, cortex: CortexProcess, turns: list[str]) -> None:
    async with session.post(cortex.url + "/v1/chat/completions", json=_body(turns)) as r:
        assert r.status == 200, await r.text()


async def test_a_conversations_next_turn_goes_where_it_began_unless_that_neuron_is_busy(
    fleet: tuple[CortexProcess, list[ScriptedNeuron], str],
) -> None:
    cortex, (a, b), policy = fleet
    conversation = ["Tell me about the sea, at length, please."]
    async with aiohttp.ClientSession() as session:
        # a busy: the conversation's first turn goes to b, the least loaded.
        held = await _open(session, cortex, ["stall"])
        assert a.calls == ["stall"]
        await _ask(session, cortex, conversation)
        assert b.calls == [conversation[0]]
        held.close()
        await _until_idle(cortex, "a")
        # Both idle now: least loaded ties go to a by name; the cache's neuron is b.
        conversation += ["Hello world", "And about rivers?"]
        await _ask(session, cortex, conversation)
        assert (b if policy == "cache_aware" else a).calls[-1] == "And about rivers?"
        if policy == "least_loaded":
            return
        # Streams of the conversation follow it to b while b is within balance_margin (2)
        # requests of a: three of them, then b is 3 beyond a's 0.
        conversation.append("Hello world")
        streams = [await _open(session, cortex, [*conversation, "stall"]) for _ in range(3)]
        assert b.calls.count("stall") == 3 and a.calls.count("stall") == 1
        # Its next turn would go to b, but b is too busy: to a, the least loaded.
        await _ask(session, cortex, [*conversation, "And about lakes?"])
        assert a.calls[-1] == "And about lakes?"
        for r in streams:
            r.close()
    metrics = cortex.metrics()
    assert (
        metric_value(metrics, "helexa_gateway_prefix_routes_total", result="cached") == 4
    )  # rivers, 3 streams
    assert metric_value(metrics, "helexa_gateway_prefix_routes_total", result="balanced") == 1


async def _until_idle(cortex: CortexProcess, neuron: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while metric_value(cortex.metrics(), "helexa_gateway_requests_in_flight", neuron=neuron):
        assert loop.time() < deadline, "the held stream never ended in cortex"
        await asyncio.sleep(0.05)
