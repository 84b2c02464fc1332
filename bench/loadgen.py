"""Closed-loop load: N concurrent streams, each sending requests back to back.

Clients for an OpenAI-compatible SSE endpoint (cortex, transformers serve) and for a neuron's
gRPC ``Generate``. Each request records its time to first token, the gaps between the chunks
that followed, and its completion tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc

PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in a large city.",
    "Write a long letter to a friend about your summer holiday.",
    "Explain the history of the printing press in detail.",
    "Describe the life cycle of a star from birth to death.",
    "Write a story about a robot who wants to become a painter.",
    "Explain how bread is made, step by step, in detail.",
]

_serial = itertools.count()


def prompt(index: int) -> str:
    """A user message no earlier request sent: a server's prefix cache can reuse the chat
    template's system prompt, as for any chat client, but never a whole earlier prompt."""
    return f"Request {next(_serial)}: {PROMPTS[index % len(PROMPTS)]}"


@dataclass
class Result:
    ttft: float
    gaps: list[float]
    tokens: int
    seconds: float


@dataclass
class Summary:
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def row(self) -> dict[str, float]:
        return {
            "tok/s": self.tokens_per_second,
            "ttft p50 ms": 1000 * percentile(self.ttfts, 50),
            "ttft p99 ms": 1000 * percentile(self.ttfts, 99),
            "itl p50 ms": 1000 * percentile(self.gaps, 50),
            "itl p99 ms": 1000 * percentile(self.gaps, 99),
            "tokens/request": self.tokens / self.requests,
        }


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


Send = Callable[[int], Awaitable[Result]]


class Arrivals:
    """When a request's chunks of text arrived: time to first, gaps between the rest."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first = self.last = 0.0
        self.gaps: list[float] = []
        self.chunks = 0

    def chunk(self) -> None:
        now = time.perf_counter()
        if not self.first:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.chunks += 1

    def result(self, tokens: int) -> Result:
        return Result(self.first - self.started, self.gaps, tokens, self.last - self.started)


async def closed_loop(send: Send, concurrency: int, per_stream: int) -> Summary:
    """``concurrency`` streams, each sending ``per_stream`` requests one after another."""
    results: list[Result] = []

    async def stream(index: int) -> None:
        for i in range(per_stream):
            results.append(await send(index * per_stream + i))

    started = time.perf_counter()
    await asyncio.gather(*(stream(i) for i in range(concurrency)))
    seconds = time.perf_counter() - started
    summary = Summary(concurrency, len(results), sum(r.tokens for r in results), seconds)
    for r in results:
        summary.ttfts.append(r.ttft)
        summary.gaps.extend(r.gaps)
    return summary


def openai_sender(
    session: aiohttp.ClientSession, base_url: str, model: str, max_tokens: int
) -> Send:
    async def send(index: int) -> Result:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt(index)}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        arrivals = Arrivals()
        usage_tokens = 0
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as reply:
            reply.raise_for_status()
            async for raw in reply.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                event: dict[str, Any] = json.loads(line[5:])
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens", 0)
                choices = event.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    arrivals.chunk()
        return arrivals.result(usage_tokens or arrivals.chunks)

    return send


def grpc_sender(
    stub: pb_grpc.NeuronStub,
    model: str,
    max_tokens: int,
    output: pb.OutputConstraint | None = None,
) -> Send:
    """Chat requests over Generate; ``output``: the constraint each answer is held to."""

    async def send(index: int) -> Result:
        message = pb.ChatMessage(role="user", content=prompt(index))
        request = pb.GenerateRequest(
            model=model,
            chat=pb.ChatMessages(messages=[message]),
            max_tokens=max_tokens,
            temperature=0,
            output=output,
        )
        arrivals = Arrivals()
        tokens = 0
        async for reply in stub.Generate(request, timeout=600):
            if reply.text:
                arrivals.chunk()
            if reply.finish_reason:
                tokens = reply.usage.completion_tokens
        return arrivals.result(tokens)

    return send


def table(rows: list[tuple[str, Summary]]) -> str:
    columns = list(rows[0][1].row())
    lines = [
        "| server | streams | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for name, summary in rows:
        values = " | ".join(f"{v:.1f}" for v in summary.row().values())
        lines.append(f"| {name} | {summary.concurrency} | {values} |")
    return "\n".join(lines)
