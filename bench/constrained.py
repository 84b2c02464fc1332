"""Constrained decoding's cost: streams answering under a JSON schema against free streams.

One neuron serves the demo model; rounds of N concurrent streams alternate between free chat
answers and answers held to a JSON schema (a grammar mask per row per step), so both see the
same machine. Each request asks for --tokens tokens and every answer, free or held to the schema, runs
that long. The neuron's own mask-time histogram is printed beside the figures.

    .venv/bin/python -m bench.constrained [--concurrency 8] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import grpc

from bench.loadgen import Summary, closed_loop, grpc_sender, table
from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import NeuronProcess, demo_model, metric_value, neuron_config

SCHEMA = {
    "type": "object",
    # A story long enough that every answer runs to --tokens, as the free ones do: requests
    # that end early would pay more prompts per token and blur the comparison.
    "properties": {"title": {"type": "string"}, "story": {"type": "string", "minLength": 2000}},
    "required": ["title", "story"],
    "additionalProperties": False,
}


async def run(args: argparse.Namespace) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="helexa-bench-constrained-"))
    neuron = NeuronProcess(
        workdir / "neuron", neuron_config([demo_model("bench")], max_batch_size=32, cpu_threads=0)
    )
    output = pb.OutputConstraint(json_schema=json.dumps(SCHEMA))
    rows: list[tuple[str, Summary]] = []
    try:
        neuron.start()
        await neuron.wait_serving()
        async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
            stub = pb_grpc.NeuronStub(channel)
            free = grpc_sender(stub, "bench", args.tokens)
            constrained = grpc_sender(stub, "bench", args.tokens, output)
            for send in (free, constrained):  # warm-up: connections, grammar compile
                await closed_loop(send, args.concurrency, 1)
            totals = {"free": 0.0, "json_schema": 0.0}
            for _ in range(args.rounds):
                for name, send in (("free", free), ("json_schema", constrained)):
                    summary = await closed_loop(send, args.concurrency, args.per_stream)
                    rows.append((name, summary))
                    totals[name] += summary.tokens_per_second
        masks = _mask_time(neuron.metrics())
    finally:
        neuron.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = totals["json_schema"] / totals["free"]
    return (
        f"{table(rows)}\n\njson_schema / free tokens/s over {args.rounds} rounds: {ratio:.3f}\n"
        f"grammar mask per step (8 constrained rows): {masks}"
    )


def _mask_time(text: str) -> str:
    total = metric_value(text, "helexa_neuron_grammar_mask_seconds_sum", model="bench")
    count = metric_value(text, "helexa_neuron_grammar_mask_seconds_count", model="bench")
    return f"{1000 * total / count:.3f} ms mean over {count:.0f} steps"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-stream", type=int, default=2, help="requests each stream sends")
    print(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
