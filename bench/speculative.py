"""Speculative decoding by prompt lookup: what it gains where answers repeat their input, and
what it costs where they do not.

One neuron holds the demo model twice (SmolLM2-135M-Instruct, the same GGUF): ``plain``
(``speculative = "off"``) and ``lookup`` (``speculative = "prompt_lookup"``), so both run on
the same process and machine; rounds alternate between them. Two workloads, greedy:

- ``echo``: a ~300-token passage to repeat with one word replaced (``bench.loadgen``'s echo
  set), up to --echo-tokens tokens;
- ``chat``: the generation benchmark's chat requests (a story, an explanation), of --tokens.

At each concurrency it prints tokens/s, TTFT and ITL per model (``bench.loadgen``), the
acceptance rate of the drafts (the neuron's accepted over drafted token counters), and how
many of the lookup model's answers are the plain model's, word for word.

    .venv/bin/python -m bench.speculative [--concurrency 1,4,8] [--rounds 2] [--k 4] [--max-rows 2]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
from pathlib import Path

import grpc

from bench.loadgen import (
    Result,
    Send,
    Summary,
    closed_loop,
    grpc_sender,
    head_commit,
    percentile,
)
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import NeuronProcess, demo_model, metric_value, neuron_config

MODELS = {"plain": "off", "lookup": "prompt_lookup"}
WORKLOADS = {"echo": "echo", "chat": "shared"}  # workload -> bench.loadgen prompt set

Key = tuple[str, str, int]  # workload, model, streams
Answers = dict[Key, dict[tuple[str, int], str]]  # each run's answers by request


async def run(args: argparse.Namespace) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="helexa-bench-speculative-"))
    models = [
        demo_model(name, dtype=args.dtype, speculative=method, speculative_tokens=args.k)
        for name, method in MODELS.items()
    ]
    config = neuron_config(models, max_batch_size=32, cpu_threads=args.threads)
    if args.max_rows:
        config["engine"]["speculative_max_rows"] = args.max_rows
    neuron = NeuronProcess(workdir / "neuron", config)
    runs: dict[Key, list[Summary]] = {}
    texts: Answers = {}
    drafted = {w: 0.0 for w in WORKLOADS}
    kept = {w: 0.0 for w in WORKLOADS}
    try:
        neuron.start()
        await neuron.wait_serving()
        async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
            stub = pb_grpc.NeuronStub(channel)
            for name in MODELS:  # warm-up: connections, lazy initialisation
                await closed_loop(grpc_sender(stub, name, 8), max(args.concurrency), 1)
            for round_ in range(args.rounds):
                for workload in args.workloads:
                    prompt_set = WORKLOADS[workload]
                    tokens = args.echo_tokens if workload == "echo" else args.tokens
                    for streams in args.concurrency:
                        for name in MODELS:
                            before = _counters(neuron.metrics())
                            send = _keeping_text(
                                grpc_sender(stub, name, tokens, None, prompt_set),
                                texts.setdefault((workload, name, streams), {}),
                            )
                            tag = f"{round_}-{streams}"  # the same requests for both models
                            summary = await closed_loop(send, streams, args.per_stream, tag)
                            runs.setdefault((workload, name, streams), []).append(summary)
                            if name == "lookup":
                                after = _counters(neuron.metrics())
                                drafted[workload] += after[0] - before[0]
                                kept[workload] += after[1] - before[1]
    finally:
        neuron.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    out = [
        f"commit {head_commit()}; dtype {args.dtype}; speculative_tokens {args.k}; "
        f"speculative_max_rows {args.max_rows or 'the default'}; "
        f"{args.threads or 'all'} torch threads; "
        f"{args.rounds} rounds; echo {args.echo_tokens} tokens at most, chat {args.tokens}; "
        f"{args.per_stream} requests a stream",
        _table(runs, texts),
        "acceptance (accepted / drafted tokens): "
        + ", ".join(
            f"{w} {kept[w] / drafted[w]:.2f} of {drafted[w]:.0f}" if drafted[w] else f"{w} -"
            for w in args.workloads
        ),
    ]
    failed = [e for summaries in runs.values() for s in summaries for e in s.errors]
    if failed:
        out.append(f"{len(failed)} requests FAILED, e.g.: {failed[0]}")
    return "\n\n".join(out)


def _counters(text: str) -> tuple[float, float]:
    """The lookup model's drafted and accepted token counters."""
    return (
        metric_value(text, "helexa_neuron_speculative_draft_tokens_total", model="lookup"),
        metric_value(text, "helexa_neuron_speculative_accepted_tokens_total", model="lookup"),
    )


def _keeping_text(send: Send, texts: dict[tuple[str, int], str]) -> Send:
    """``send``, keeping each answer's text by its request."""

    async def keeping(tag: str, index: int) -> Result:
        result = await send(tag, index)
        texts[(tag, index)] = result.text
        return result

    return keeping


def _table(runs: dict[Key, list[Summary]], texts: Answers) -> str:
    lines = [
        "| workload | model | streams | tok/s median (range) | TTFT p50 ms | ITL p50 ms "
        "| tokens/request | same answer as plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (workload, name, streams), summaries in runs.items():
        rates = [s.tokens_per_second for s in summaries]
        requests = sum(s.requests for s in summaries)
        tokens = sum(s.tokens for s in summaries)
        ttft = statistics.median([percentile(s.ttfts, 50) for s in summaries])
        itl = statistics.median([percentile(s.gaps, 50) for s in summaries])
        same = ""
        if name != "plain":
            mine, plain = texts[(workload, name, streams)], texts[(workload, "plain", streams)]
            same = f"{sum(plain.get(k) == t for k, t in mine.items())}/{len(mine)}"
        lines.append(
            f"| {workload} | {name} | {streams} | {statistics.median(rates):.1f} "
            f"({min(rates):.1f}-{max(rates):.1f}) | {1000 * ttft:.0f} | {1000 * itl:.1f} "
            f"| {tokens / max(requests, 1):.1f} | {same} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--concurrency", default="1,4,8", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--tokens", type=int, default=64, help="chat answers' tokens")
    parser.add_argument("--echo-tokens", type=int, default=400, help="echo answers' limit")
    parser.add_argument("--per-stream", type=int, default=1, help="requests each stream sends")
    parser.add_argument("--rounds", type=int, default=2, help="each model's runs, interleaved")
    parser.add_argument("--k", type=int, default=4, help="speculative_tokens of the lookup model")
    parser.add_argument(
        "--workloads",
        type=lambda text: text.split(","),
        default=list(WORKLOADS),
        help="comma-separated: echo, chat",
    )
    parser.add_argument(
        "--max-rows", type=int, default=0, help="engine.speculative_max_rows (0: the default)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    # One: on a host whose cores other processes share, a torch thread that is not scheduled
    # stalls every step (25-70x slower ones were seen); 0: one per core.
    parser.add_argument("--threads", type=int, default=1, help="neuron's devices.cpu_threads")
    print(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
