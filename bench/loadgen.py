"""Closed-loop load: N concurrent streams, each sending requests back to back.

Clients for an OpenAI-compatible SSE endpoint (cortex, transformers serve, llama.cpp) and for a
neuron's gRPC ``Generate``. Each request records its time to first token, the gaps between the
chunks that followed, its completion tokens and how it ended. A request that fails (a status,
an error event, no finish reason, or fewer tokens than asked without a ``stop`` to explain
them) is an error, counted apart from the figures.

Requests are the same bytes for every server: request ``index`` of a run tagged ``tag`` has
one text whoever receives it. Two prompt sets: ``shared`` (a user message only, so the chat
template's default system prompt is a prefix every request shares, as for any chat client) and
``unique`` (a system prompt of its own per request, so a prefix cache has almost nothing to
reuse). A third, ``echo``, asks for a ~300-token passage back with one word replaced: an
answer that repeats its input, as code edits and quoting agents' answers do.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc

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

PROMPT_SETS = ("shared", "unique")

# The ``echo`` set's passage (about 300 tokens) and the words its requests replace.
PASSAGE = (
    "The old lighthouse stood at the end of a narrow spit of rock, a mile from the nearest "
    "house. Every evening the keeper climbed the one hundred and twelve steps of its tower, "
    "trimmed the wick, polished the glass and lit the lantern, and every morning he climbed "
    "them again to put it out. Ships that passed in the night never saw him, only the light "
    "that turned above the water, once every ten seconds, as it had for sixty years. In "
    "winter the storms came in from the west and threw the sea against the rock so hard that "
    "the whole tower shook, and spray rattled on the windows of the lantern room like gravel. "
    "In summer the water was calm and green, and seals slept on the flat stones below the "
    "wall. The keeper kept a log of every ship he saw, the weather at dawn and at dusk, and "
    "the hours the light had burned. He wrote in pencil, in a small neat hand, and when a "
    "book was full he tied it with string and put it on the shelf beside the others. There "
    "were forty-one books on the shelf when the letter came to say that the light would be "
    "run by a machine from the following spring, and that his services would no longer be "
    "needed. He read the letter twice, folded it, and climbed the stairs to light the lamp."
)
REPLACEMENTS = [
    ("keeper", "warden"),
    ("tower", "column"),
    ("ships", "boats"),
    ("rock", "stone"),
    ("light", "beacon"),
    ("sea", "ocean"),
    ("winter", "autumn"),
    ("books", "volumes"),
]


def messages(prompt_set: str, tag: str, index: int) -> list[tuple[str, str]]:
    """The (role, content) messages of request ``index`` in the run tagged ``tag``: never a
    whole earlier prompt (tags differ between runs), the same for every server."""
    if prompt_set == "echo":
        old, new = REPLACEMENTS[index % len(REPLACEMENTS)]
        ask = (
            f"Request {tag}-{index}: repeat this text exactly, word for word, but replace the "
            f"word '{old}' with '{new}' everywhere. Write only the text.\n\n{PASSAGE}"
        )
        return [("user", ask)]
    user = ("user", f"Request {tag}-{index}: {PROMPTS[index % len(PROMPTS)]}")
    if prompt_set == "shared":
        return [user]
    system = f"You are writer {tag}-{index}, who answers at length and in plain words."
    return [("system", system), user]


@dataclass
class Result:
    ttft: float
    gaps: list[float]
    tokens: int
    seconds: float
    error: str = ""  # why the request failed; "" when it did not
    text: str = ""  # the answer's text (chat streams)
    prompt_tokens: int = 0  # the server's usage, where it gives it
    cached_tokens: int = 0


def judged(result: Result, finish: str | None, max_tokens: int, exact: bool = True) -> Result:
    """``result`` marked as an error unless it ended with a finish reason that explains its
    tokens: ``length`` with all of them, or ``stop`` with no more (``exact``: its tokens were
    counted by the server; text chunks alone only show that it finished)."""
    if result.error:
        return result
    if finish is None:
        result.error = "no finish reason"
    elif not exact:
        pass
    elif finish == "length" and result.tokens != max_tokens:
        result.error = f"finish length after {result.tokens} of {max_tokens} tokens"
    elif finish not in ("length", "stop") or result.tokens > max_tokens:
        result.error = f"finish {finish} after {result.tokens} of {max_tokens} tokens"
    return result


@dataclass
class Summary:
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

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


def head_commit() -> str:
    """The commit the figures were measured on (``+`` when the tree has changes)."""
    run = functools.partial(subprocess.run, capture_output=True, text=True)
    commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip() or "unknown"
    return commit + ("+" if run(["git", "status", "--porcelain", "-uno"]).stdout else "")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


Send = Callable[[str, int], Awaitable[Result]]


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

    def result(self, tokens: int, error: str = "") -> Result:
        return Result(self.first - self.started, self.gaps, tokens, self.last - self.started, error)


async def closed_loop(send: Send, concurrency: int, per_stream: int, tag: str = "") -> Summary:
    """``concurrency`` streams, each sending ``per_stream`` requests one after another; the
    requests are those of the run ``tag`` (a fresh one when empty)."""
    tag = tag or f"r{next(_runs)}"
    results: list[Result] = []

    async def stream(index: int) -> None:
        for i in range(per_stream):
            results.append(await send(tag, index * per_stream + i))

    started = time.perf_counter()
    await asyncio.gather(*(stream(i) for i in range(concurrency)))
    seconds = time.perf_counter() - started
    good = [r for r in results if not r.error]
    summary = Summary(concurrency, len(good), sum(r.tokens for r in good), seconds)
    for r in results:
        if r.error:
            summary.errors.append(r.error)
            continue
        summary.ttfts.append(r.ttft)
        summary.gaps.extend(r.gaps)
    return summary


_runs = itertools.count()


def openai_sender(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    max_tokens: int,
    prompt_set: str = "shared",
    extra: dict[str, Any] | None = None,
) -> Send:
    """Chat requests over SSE; ``extra``: body fields a server needs for the same sampling."""

    async def send(tag: str, index: int) -> Result:
        chat = [{"role": r, "content": c} for r, c in messages(prompt_set, tag, index)]
        return await chat_stream(session, base_url, model, chat, max_tokens, extra)

    return send


async def chat_stream(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    chat: list[dict[str, str]],
    max_tokens: int,
    extra: dict[str, Any] | None = None,
) -> Result:
    """One greedy streamed chat completion of ``chat``: its arrivals, text and usage, judged.

    A server that streams no usage is counted by its finish: ``length`` is ``max_tokens``
    reached; otherwise its chunks of text are counted (one a token, or fewer)."""
    body = {
        "model": model,
        "messages": chat,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    arrivals = Arrivals()
    usage: dict[str, Any] = {}
    text: list[str] = []
    finish: str | None = None
    try:
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as reply:
            if reply.status != 200:
                return arrivals.result(0, f"HTTP {reply.status}")
            async for raw in reply.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                event: dict[str, Any] = json.loads(line[5:])
                if "error" in event:
                    return arrivals.result(0, f"error event: {event['error']}")
                usage = event.get("usage") or usage
                choices = event.get("choices") or []
                content = (choices[0].get("delta") or {}).get("content") if choices else None
                if content:
                    arrivals.chunk()
                    text.append(content)
                if choices and choices[0].get("finish_reason"):
                    finish = choices[0]["finish_reason"]
    except (aiohttp.ClientError, TimeoutError) as e:
        return arrivals.result(0, f"{type(e).__name__}: {e}")
    tokens = usage.get("completion_tokens", 0) or (max_tokens if finish == "length" else 0)
    exact = bool(tokens)  # else only the text chunks were counted
    result = arrivals.result(tokens or arrivals.chunks)
    result.text = "".join(text)
    result.prompt_tokens = usage.get("prompt_tokens", 0)
    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return judged(result, finish, max_tokens, exact)


FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


def grpc_sender(
    stub: pb_grpc.NeuronStub,
    model: str,
    max_tokens: int,
    output: pb.OutputConstraint | None = None,
    prompt_set: str = "shared",
) -> Send:
    """Chat requests over Generate; ``output``: the constraint each answer is held to."""

    async def send(tag: str, index: int) -> Result:
        chat = [
            pb.ChatMessage(role=role, content=content)
            for role, content in messages(prompt_set, tag, index)
        ]
        request = pb.GenerateRequest(
            model=model,
            chat=pb.ChatMessages(messages=chat),
            max_tokens=max_tokens,
            temperature=0,
            output=output,
        )
        arrivals = Arrivals()
        tokens = 0
        finish: str | None = None
        text: list[str] = []
        try:
            async for reply in stub.Generate(request, timeout=600):
                if reply.text:
                    arrivals.chunk()
                    text.append(reply.text)
                if reply.finish_reason:
                    tokens = reply.usage.completion_tokens
                    finish = FINISH.get(
                        reply.finish_reason, pb.FinishReason.Name(reply.finish_reason)
                    )
        except grpc.aio.AioRpcError as e:
            return arrivals.result(0, f"{e.code().name}: {e.details()}")
        result = arrivals.result(tokens)
        result.text = "".join(text)
        return judged(result, finish, max_tokens)

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
