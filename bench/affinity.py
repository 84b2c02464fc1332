"""Cache-aware routing against least-loaded routing: two neurons (the demo model, one torch
thread each, one per core), cortex in front, multi-turn chats.

    .venv/bin/python -m bench.affinity [--conversations 8] [--turns 6] [--think 2] [--rounds 2]

Each conversation has a system prompt of its own (~250 tokens, as an agent's instructions)
and goes turn by turn: each turn sends every earlier message, the answers included, plus a new
question, and waits for its answer (16 tokens, greedy) before the next. The conversations run
at once, each pausing before each turn for a think time drawn from its own seeded generator
(uniform up to ``--think`` seconds; the same draws for both policies), so turns arrive as
people's and agents' do, not in lockstep (in lockstep, least-loaded routing sends each
conversation back where it was by the symmetry of the loads alone). Both policies run in each round (alternating which goes first), each on neurons
started afresh, so neither finds the other's cache. Figures: prompt tokens served from the
neurons' prefix caches (``usage.prompt_tokens_details.cached_tokens`` over prompt tokens),
TTFT p50 and p90, and completion tokens/s, median over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.loadgen import chat_stream, head_commit, percentile
from tests.harness import CortexProcess, NeuronProcess, cortex_config, demo_model, neuron_config

MODEL = "bench"
QUESTIONS = [
    "What should I check first?",
    "And after that?",
    "Which of those matters most, and why?",
    "Summarise it in one sentence.",
    "What would you do differently next time?",
    "Give me one example.",
]


@dataclass
class Run:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0


def system_prompt(conversation: int) -> str:
    rules = " ".join(
        f"Rule {i}: keep answer {conversation}-{i} short, concrete and in plain words."
        for i in range(16)
    )
    return f"You are assistant {conversation} of a support team. {rules}"


async def turn(
    session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], run: Run
) -> str:
    """One turn of 16 greedy tokens, counted into ``run``; its answer's text."""
    result = await chat_stream(session, url, MODEL, messages, 16)
    if result.error:
        run.errors += 1
        return result.text
    run.ttfts.append(result.ttft)
    run.prompt_tokens += result.prompt_tokens
    run.cached_tokens += result.cached_tokens
    run.completion_tokens += result.tokens
    return result.text


async def conversation(
    session: aiohttp.ClientSession, url: str, index: int, args: argparse.Namespace, run: Run
) -> None:
    messages = [{"role": "system", "content": system_prompt(index)}]
    think = random.Random(index)
    for t in range(args.turns):
        await asyncio.sleep(think.uniform(0, args.think))
        messages.append({"role": "user", "content": QUESTIONS[(index + t) % len(QUESTIONS)]})
        answer = await turn(session, url, messages, run)
        messages.append({"role": "assistant", "content": answer})


async def measure(policy: str, args: argparse.Namespace, workdir: Path) -> Run:
    neurons = [
        NeuronProcess(
            workdir / f"n{i}",
            neuron_config([demo_model(MODEL, dtype=args.dtype)], max_batch_size=16),
        )
        for i in range(2)
    ]
    cortex = CortexProcess(
        workdir / "cortex", cortex_config(neurons, routing={"policy": policy}), models=[]
    )
    run = Run()
    try:
        for neuron in neurons:
            neuron.start()
        for neuron in neurons:
            await neuron.wait_serving()
        cortex.start()
        await cortex.wait_ready()
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    conversation(session, cortex.url, i, args, run)
                    for i in range(args.conversations)
                )
            )
            run.seconds = time.perf_counter() - started
    finally:
        cortex.stop()
        for neuron in neurons:
            neuron.stop()
    return run


async def main_async(args: argparse.Namespace) -> int:
    runs: dict[str, list[Run]] = {"cache_aware": [], "least_loaded": []}
    with tempfile.TemporaryDirectory(prefix="helexa-bench-affinity-") as tmp:
        for round_ in range(args.rounds):
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for policy in order:
                runs[policy].append(await measure(policy, args, Path(tmp) / f"{policy}-{round_}"))
    print(
        f"commit {head_commit()}; {args.conversations} conversations x {args.turns} turns, "
        f"think time up to {args.think:g} s, 2 neurons, {args.dtype}; median of {args.rounds} "
        "rounds\n"
    )
    print("| policy | prompt tokens from cache | TTFT p50 ms | TTFT p90 ms | tok/s | errors |")
    print("|---|---|---|---|---|---|")
    errors = 0
    for policy, measured in runs.items():
        cached = statistics.median(r.cached_tokens / max(r.prompt_tokens, 1) for r in measured)
        p50 = statistics.median(percentile(r.ttfts, 50) for r in measured)
        p90 = statistics.median(percentile(r.ttfts, 90) for r in measured)
        rate = statistics.median(r.completion_tokens / r.seconds for r in measured)
        failed = sum(r.errors for r in measured)
        errors += failed
        print(
            f"| {policy} | {100 * cached:.0f}% | {1000 * p50:.0f} | {1000 * p90:.0f} "
            f"| {rate:.1f} | {failed or ''} |"
        )
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--think", type=float, default=2.0, help="most seconds between turns")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    if asyncio.run(main_async(parser.parse_args())):
        raise SystemExit("requests failed: the figures above are not to be trusted")


if __name__ == "__main__":
    main()
