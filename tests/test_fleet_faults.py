"""Faults between hosts: cortex and two neurons on hosts of their own (network namespaces,
tests/netns.py), the network between them failing while they serve.

A link taken down and a host that silently drops every packet: the stream on that neuron ends
with an error event once cortex's channel keepalive finds the link dead, the poller marks the
neuron down, new requests are answered by the other neuron, and once the link is back the
neuron is up and used again. Delay and loss (``tc netem``): every answer still comes back
whole and correct. Each test counts the requests it sent, the answers that came back whole
and the errors, and checks each request was served exactly once across the fleet; it asserts
the order of events, never how long they took.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import (
    DEMO_ID,
    CortexProcess,
    NeuronProcess,
    Stream,
    demo_model,
    metric_value,
    neurons_up,
    open_stream,
    served,
    until_polled,
    wait_up,
)
from tests.netns import Host, hosted_fleet, netem_refusal

# float32: a greedy answer does not depend on the batch around it, so an answer given during a
# fault must equal the one given before it.
MODEL = demo_model(dtype="float32")
# cortex's channel keepalive as short as a neuron allows (a ping every 5 s, 2 s to answer it);
# no stall timeout to speak of, so only the keepalive can end a stream on a dead link.
KEEPALIVE = {"keepalive_time": 5.0, "keepalive_timeout": 2.0}
STALL = 600.0
# A dead link is found (its stream ended, its neuron marked down) within the keepalive's bound
# and the poller's (poll_interval 0.5 s + rpc_timeout 2 s), with room for two busy cores.
DETECTED_WITHIN = KEEPALIVE["keepalive_time"] + KEEPALIVE["keepalive_timeout"] + 45.0
QUESTIONS = [
    "What is the capital of France?",
    "Name a colour of the sky.",
    "What do bees make?",
    "Say hello in Spanish.",
]
STORY = "Write a long story about a dragon."
TIMEOUT = aiohttp.ClientTimeout(total=600)


@dataclass
class Tally:
    """What a test sent and what came back: every request is whole or an error, never both,
    never neither."""

    sent: int = 0
    whole: int = 0
    errors: list[str] = field(default_factory=list)

    def stream_ended(self, stream: Stream) -> None:
        """Count a stream (already counted as sent) read to its ``[DONE]``."""
        if _whole(stream):
            self.whole += 1
        else:
            self.errors.append(str(stream.events[-3:]))

    def check(self, errors: int) -> None:
        assert self.sent == self.whole + len(self.errors), self
        assert len(self.errors) == errors, self.errors


def _whole(stream: Stream) -> bool:
    """No error event, one finish reason, one ``[DONE]`` and that last."""
    return (
        not stream.errored()
        and len(stream.finish_reasons()) == 1
        and stream.events.count(b"data: [DONE]") == 1
        and stream.events[-1] == b"data: [DONE]"
    )


def _body(content: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": DEMO_ID,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def ask(
    session: aiohttp.ClientSession,
    cortex: CortexProcess,
    tally: Tally,
    question: str,
    stream: bool = False,
) -> str:
    """One short greedy chat completion, counted: its text when it came back whole."""
    tally.sent += 1
    async with session.post(
        cortex.url + "/v1/chat/completions", json=_body(question, 8, stream)
    ) as r:
        if r.status != 200:
            tally.errors.append(f"{r.status}: {await r.text()}")
            return ""
        if stream:
            answer = Stream(r)
            await answer.rest()
            tally.stream_ended(answer)
            return answer.text()
        choice = (await r.json())["choices"][0]
    if choice["finish_reason"] not in ("stop", "length"):
        tally.errors.append(str(choice))
        return ""
    tally.whole += 1
    return str(choice["message"]["content"])


async def _references(
    session: aiohttp.ClientSession, cortex: CortexProcess, tally: Tally
) -> dict[str, str]:
    """Each question's answer on the whole fleet, asked at once (so of both neurons)."""
    answers = await asyncio.gather(*(ask(session, cortex, tally, q) for q in QUESTIONS))
    assert all(answers), answers
    return dict(zip(QUESTIONS, answers, strict=True))


def _relaying(cortex: CortexProcess) -> list[float]:
    """What cortex is relaying from n0 and from n1 now."""
    text = cortex.metrics()
    return [
        metric_value(text, "helexa_gateway_requests_in_flight", neuron=name)
        for name in ("n0", "n1")
    ]


async def _stream_on_each(session: aiohttp.ClientSession, cortex: CortexProcess) -> list[Stream]:
    """A long stream generating on each neuron, in the neurons' order."""
    await until_polled(lambda: not any(_relaying(cortex)), 30, "cortex still relaying")
    streams: list[Stream | None] = [None, None]
    for i in range(2):
        # Distinct prompts: each new to the cache-aware router, so each to the least loaded.
        stream = await open_stream(session, cortex, _body(f"{STORY} Part {i}.", 200, True))
        relaying = _relaying(cortex)
        on = [j for j in range(2) if relaying[j] and streams[j] is None]
        assert len(on) == 1, relaying
        streams[on[0]] = stream
    assert all(streams)
    return [s for s in streams if s is not None]


async def _each_served_once(neurons: list[NeuronProcess], before: list[float], sent: int) -> None:
    """Every request sent was served by exactly one neuron (counted once it ended there)."""

    def total() -> float:
        return sum(served(n) - b for n, b in zip(neurons, before, strict=True))

    await until_polled(lambda: total() >= sent, 120, f"the neurons served fewer than {sent}")
    assert total() == sent, "a request was served twice"


FAULTS: dict[str, tuple[Callable[[Host], None], Callable[[Host], None]]] = {
    "link_down": (Host.cut, Host.mend),
    "every_packet_dropped": (Host.drop_everything, Host.stop_dropping),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_dead_host_ends_its_stream_its_requests_fail_over_and_the_fleet_heals(
    fault: str, namespaces: None, demo_dir: Path, tmp_path: Path
) -> None:
    break_it, repair = FAULTS[fault]
    async with (
        hosted_fleet(
            tmp_path,
            model=MODEL,
            fleet=KEEPALIVE,
            timeouts={"stall": STALL},
            routing={"resume_streams": False},  # the cut stream's error event is the signal
        ) as hosted,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        cortex, neurons = hosted.cortex, hosted.neurons
        n0, n1 = neurons
        tally = Tally()
        before = [served(n) for n in neurons]
        expected = await _references(session, cortex, tally)
        on_n0, on_n1 = await _stream_on_each(session, cortex)
        tally.sent += 2
        n0_before = served(n0)
        events: list[str] = []

        async def stream_on_n1_ends() -> None:
            try:
                await asyncio.wait_for(on_n1.rest(), DETECTED_WITHIN)
            except TimeoutError:
                raise AssertionError("the dead link went unnoticed past its bound") from None
            events.append("n1's stream ended")

        async def n1_marked_down() -> None:
            await wait_up(cortex, ["n0"], within=DETECTED_WITHIN)
            events.append("n1 down")

        break_it(hosted.hosts["n1"])
        events.append("broken")
        # While cortex finds out: the stream there ends, the other goes on, and new requests
        # (some meant for n1, whose beginnings it may hold) are answered by n0.
        _, _, _, *during = await asyncio.gather(
            stream_on_n1_ends(),
            n1_marked_down(),
            on_n0.rest(),
            *(ask(session, cortex, tally, q, stream=i % 2 == 0) for i, q in enumerate(QUESTIONS)),
        )
        tally.stream_ended(on_n0)
        tally.stream_ended(on_n1)
        assert during == [expected[q] for q in QUESTIONS]
        assert _whole(on_n0), on_n0.events[-3:]
        # The stream on n1: text, then the error event and [DONE]; never a finish reason.
        assert on_n1.text() and not on_n1.finish_reasons(), on_n1.events[-3:]
        assert on_n1.events[-1] == b"data: [DONE]" and b'"error"' in on_n1.events[-2]
        error = on_n1.error()
        assert error["code"] == "neuron_failed" and "neuron n1" in error["message"], error
        # With n1 down, every request goes to n0, each once.
        after = [await ask(session, cortex, tally, q) for q in QUESTIONS]
        assert after == [expected[q] for q in QUESTIONS]
        answered_by_n0 = 1 + len(during) + len(after)  # its stream too
        await until_polled(lambda: served(n0) - n0_before >= answered_by_n0, 60, "n0 served fewer")
        assert served(n0) - n0_before == answered_by_n0

        repair(hosted.hosts["n1"])
        events.append("repaired")
        await wait_up(cortex, ["n0", "n1"])
        events.append("n1 up")
        n1_before = served(n1)
        # Distinct conversations at once: the least loaded takes each, so both neurons do.
        healed = await asyncio.gather(
            *(ask(session, cortex, tally, f"Hello again, guest {i}.") for i in range(4))
        )
        assert all(healed), healed
        await until_polled(lambda: served(n1) > n1_before, 60, "n1 was not used again")
        events.append("n1 used again")

        tally.check(errors=1)  # the stream on n1, and nothing else
        await _each_served_once(neurons, before, tally.sent)
        assert events.index("broken") < events.index("n1's stream ended")
        assert events.index("broken") < events.index("n1 down") < events.index("repaired")
        assert events[-3:] == ["repaired", "n1 up", "n1 used again"]
        log = cortex.log().splitlines()
        down = next(i for i, line in enumerate(log) if "neuron down neuron=n1" in line)
        up = next(i for i, line in enumerate(log) if "neuron up neuron=n1" in line and i > down)
        assert down < up


async def test_delay_and_loss_between_hosts_leave_every_answer_whole_and_correct(
    namespaces: None, demo_dir: Path, tmp_path: Path
) -> None:
    reason = netem_refusal()
    if reason is not None:
        pytest.skip(reason)
    # Polls that wait out lost packets (a slow link is not a dead one).
    fleet = {"rpc_timeout": 20.0, "down_after_failures": 3}
    async with (
        hosted_fleet(tmp_path, model=MODEL, fleet=fleet) as hosted,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        cortex, neurons = hosted.cortex, hosted.neurons
        tally = Tally()
        before = [served(n) for n in neurons]
        expected = await _references(session, cortex, tally)
        for name in ("n0", "n1"):
            hosted.hosts[name].degrade(delay_ms=200, loss_percent=5)
        try:
            # Streamed and whole, at once (so on both neurons), each question twice.
            asked = QUESTIONS * 2
            answers = await asyncio.gather(
                *(ask(session, cortex, tally, q, stream=i % 2 == 0) for i, q in enumerate(asked))
            )
            story = await open_stream(session, cortex, _body(STORY, 64, True))
            tally.sent += 1
            await story.rest()
            tally.stream_ended(story)
            assert await neurons_up(cortex) == ["n0", "n1"]
        finally:
            for name in ("n0", "n1"):
                hosted.hosts[name].restore()
        assert answers == [expected[q] for q in asked]
        assert _whole(story), story.events[-3:]
        tally.check(errors=0)
        await _each_served_once(neurons, before, tally.sent)
