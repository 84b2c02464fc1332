"""A fleet of two real neurons behind a real cortex, each on a host of its own (a network
namespace, tests/netns.py): spreading, failure, recovery, draining.

The neurons are shared by the tests of this module, in order: a test that kills or stops one
brings it back (on the same ports) or is the last to use it.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from tests.harness import (
    DEMO_ID,
    CortexProcess,
    NeuronProcess,
    Stream,
    cortex_config,
    free_port,
    metric_value,
    open_stream,
    served,
    until,
    wait_up,
)
from tests.netns import hosted_fleet

# Generous: two neurons and cortex share two cores with whatever else runs here.
TIMEOUT = aiohttp.ClientTimeout(total=600)


@pytest.fixture(scope="module")
async def fleet(
    namespaces: None, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[CortexProcess, list[NeuronProcess]]]:
    # A neuron's failure mid-stream is seen as the client's error event here (the switch
    # off); tests/test_cortex_resume.py has the stream go on on the other neuron.
    root = tmp_path_factory.mktemp("fleet")
    async with hosted_fleet(root, routing={"resume_streams": False}) as hosted:
        yield hosted.cortex, hosted.neurons


def _body(content: str = "Hi", **extra: Any) -> dict[str, Any]:
    return {
        "model": DEMO_ID,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        **extra,
    }


async def _chat(session: aiohttp.ClientSession, cortex: CortexProcess, **extra: Any) -> int:
    async with session.post(
        cortex.url + "/v1/chat/completions", json=_body(max_tokens=8, **extra)
    ) as r:
        await r.read()
        return r.status


async def _open(session: aiohttp.ClientSession, cortex: CortexProcess, **extra: Any) -> Stream:
    return await open_stream(session, cortex, _body(stream=True, **extra))


async def test_concurrent_requests_spread_across_both_neurons(
    fleet: tuple[CortexProcess, list[NeuronProcess]],
) -> None:
    cortex, neurons = fleet
    before = [served(n) for n in neurons]
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        # Six conversations (not one prompt six times, which cache-aware routing keeps
        # together up to [routing] balance_margin): each new, so each to the least loaded.
        statuses = await asyncio.gather(
            *(_chat(session, cortex, content=f"Say hello to guest {i}.") for i in range(6))
        )
    assert statuses == [200] * 6
    after = [served(n) for n in neurons]
    each = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(each) == 6
    assert all(s >= 2 for s in each), each


async def test_sigkilled_neuron_is_marked_down_and_the_fleet_recovers(
    fleet: tuple[CortexProcess, list[NeuronProcess]],
) -> None:
    cortex, (_, n1) = fleet
    story = "Write a long story about a dragon."
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        # Mid-run: one stream on each neuron (the second goes to the less loaded one).
        # Two conversations: cache-aware routing would keep one prompt's copies together.
        first = await _open(session, cortex, content=story, max_tokens=120)
        second = await _open(session, cortex, content=story + " Another.", max_tokens=120)
        n1.send(signal.SIGKILL)
        n1.wait_exit(30)
        # The stream on the dead neuron ends with an error event; the other one completes.
        await asyncio.gather(first.rest(), second.rest())
        assert [first.errored(), second.errored()].count(True) == 1
        # A clean error event, never a truncated answer passed off as finished.
        (cut,) = [s for s in (first, second) if s.errored()]
        assert not any(b'"finish_reason":"' in e for e in cut.events), cut.events[-3:]
        assert b'"code":"neuron_failed"' in cut.events[-2]
        # New requests go to the live neuron (retried there before their first token).
        assert [await _chat(session, cortex) for _ in range(4)] == [200] * 4
        await wait_up(cortex, ["n0"])
        assert metric_value(cortex.metrics(), "helexa_gateway_neuron_up", neuron="n1") == 0
        # Restarted on the same ports, it is up again on its own and gets requests.
        n1.start()
        await n1.wait_serving()
        await wait_up(cortex, ["n0", "n1"])
        statuses = await asyncio.gather(
            *(_chat(session, cortex, content=f"Hello again, {i}.") for i in range(4))
        )
        assert statuses == [200] * 4
        assert served(n1) >= 1
    assert metric_value(cortex.metrics(), "helexa_gateway_neuron_up", neuron="n1") == 1


async def test_neuron_sigterm_lets_the_stream_finish_and_new_requests_go_elsewhere(
    fleet: tuple[CortexProcess, list[NeuronProcess]],
) -> None:
    cortex, (n0, n1) = fleet
    await wait_up(cortex, ["n0", "n1"])
    story = "Write a long story about a dragon."
    # Counted before n0's streams open: one may finish before the last opens.
    served_n0 = served(n0)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        on_n0 = await _open(session, cortex, content=story, max_tokens=150)
        on_n1 = await _open(session, cortex, content=story + " Another.", max_tokens=60)
        # A second stream on n0 (its prompt's neuron, and the tie's by name): n1 is now the
        # less loaded, the one new requests would go to if its draining were ignored.
        also_n0 = await _open(session, cortex, content=story, max_tokens=150)
        n1.send(signal.SIGTERM)
        # Each is answered, by n0: one cortex sent to the draining n1 before a poll told it
        # so is refused there (UNAVAILABLE, before any token) and retried on n0.
        answers = []
        for i in range(3):  # new conversations: no prefix ties them to a neuron
            async with session.post(
                cortex.url + "/v1/chat/completions",
                json=_body(f"Say hello to newcomer {i}.", max_tokens=4),
            ) as r:
                answers.append((r.status, await r.text()))
        assert [status for status, _ in answers] == [200] * 3, answers
        assert all(json.loads(body)["choices"][0]["message"]["content"] for _, body in answers)
        events = await on_n1.rest()
        await on_n0.rest()
        await also_n0.rest()
    # All three went to n0 (and its two streams finished too). The neuron counts a request
    # just after sending its last message: wait for the count.
    await until(lambda: served(n0) - served_n0 == 3 + 2, 10, "n0 did not serve all three")
    assert not on_n1.errored(), events[-3:]
    final = json.loads(events[-2][len(b"data: ") :])
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert n1.wait_exit(60) == 0
    await wait_up(cortex, ["n0"])


async def test_the_poller_survives_any_exception_and_keeps_polling(tmp_path: Path) -> None:
    # A stand-in for a neuron whose answer breaks the poll in a way no RPC error names
    # (fault injection: the real channel is there, its stub replaced).
    from cortex.config import load_config
    from cortex.fleet import Fleet
    from cortex.neuronlink import Link

    class Broken:
        def __getattr__(self, name: str) -> Any:
            async def call(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("an answer the poll cannot read")

            return call

    path = tmp_path / "cortex.toml"
    config_dict = cortex_config([], poll_interval=0.05)
    config_dict["neurons"] = [{"name": "n0", "endpoint": f"127.0.0.1:{free_port()}"}]
    path.write_text(tomli_w.dumps(config_dict))
    config = load_config(path)
    fleet = Fleet(config, {"n0": Link()})
    neuron = fleet.neurons[0]
    neuron.health = neuron.stub = Broken()  # type: ignore[assignment]
    await fleet.start()
    try:
        assert neuron.status == "down" and "RuntimeError" in neuron.error
        first = neuron.failures
        await until(lambda: neuron.failures > first + 2, 10, "the poller stopped polling")
    finally:
        await fleet.close()
