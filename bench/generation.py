"""Generation benchmark: SmolLM2-135M-Instruct on the CPU, chat requests of 64 output tokens
at 1, 4, 8 and 16 concurrent streams, against each server in turn in one run:

- the bare forward step, KV cache of ~64 tokens, of transformers' forward and of neuron's
  (the ceiling of the engine: what a step costs with no server, sampling or streaming). The
  transformers step is its model's forward over a ``DynamicCache``: the path ``transformers
  serve`` runs without continuous batching; ``--continuous-batching`` runs a paged cache
  instead, which this step does not measure (its offline ``generate_batch`` on this CPU made
  one step a second in transformers 5.24, a figure of its scheduling, not of its step);
- neuron over gRPC, and cortex → neuron over HTTP (what clients use);
- ``transformers serve`` on the same materialised model files, with and without
  ``--continuous-batching``;
- llama.cpp (llama-cpp-python's OpenAI server) on the GGUF itself, its Q4_1 weights run
  natively: a peer in a format of its own, not a dtype (see ``llama_cpp_server``; it serves
  one request at a time). The output ends with neuron's and cortex's tokens/s and TTFT as
  ratios of its own at 1 and 8 streams.

    .venv/bin/python -m bench.generation [--concurrency 1,4,8,16] [--tokens 64] [--rounds 3]
        [--servers neuron,cortex,transformers-cb,transformers,llama.cpp]

Every server gets the same requests (``bench.loadgen``: the same bytes, by run tag and index),
in the same dtype (``--dtype``, bfloat16 unless told: neuron's ``auto`` would pick float32 on a
CPU without native bf16; llama.cpp keeps the GGUF's Q4_1), for each of the two prompt sets (a
shared chat template, and a system prompt of its own per request). Servers run one at a time,
each started afresh per round so they never compete for the cores and no round reuses another's
prefix cache; the rounds interleave the servers. The table gives each figure's median over the
rounds with its range, and p99s only where there are 100 samples. A failed request (see
``bench.loadgen``) is counted, shown, and fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import aiohttp
import grpc

from bench.loadgen import (
    PROMPT_SETS,
    Send,
    Summary,
    closed_loop,
    grpc_sender,
    head_commit,
    openai_sender,
    percentile,
)
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import (
    DEMO_GGUF,
    SHARED_CACHE,
    CortexProcess,
    NeuronProcess,
    cortex_config,
    demo_model,
    free_port,
    neuron_config,
)


def bare_step_ceiling(
    model_dir: Path, batches: list[int], engine: str, dtype_name: str
) -> dict[int, float]:
    """Tokens/s of the bare decode step at each batch size: no server, no sampling.

    ``engine`` is "transformers" (its own forward, what ``transformers serve`` runs),
    "neuron" (neuron's forward as it serves: its decode steps in the CPU kernel) or
    "neuron-torch" (the same forward with its decode steps left to torch).
    """
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from bench.kvcache import load_forward, paged_step

    if engine.startswith("neuron"):
        forward = load_forward(model_dir, dtype_name, kernel=engine == "neuron")
    else:
        dtype = getattr(torch, dtype_name)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    ceiling = {}
    with torch.inference_mode():
        for batch in batches:
            prompt = torch.randint(0, 1000, (batch, 64))
            if engine.startswith("neuron"):
                # The engine's runner over its paged cache, without prefix cache (the prompts
                # are random): a step is its ``decode``.
                step = paged_step(forward, prompt, 64)
            else:
                cache = DynamicCache(config=model.config)
                model(input_ids=prompt, past_key_values=cache)
                step = functools.partial(_transformers_step, model, cache)
            token = torch.randint(0, 1000, (batch, 1))
            for _ in range(3):  # warm up
                step(token)
            steps = 20
            started = time.perf_counter()
            for _ in range(steps):
                token = step(token).argmax(-1, keepdim=True)
            ceiling[batch] = batch * steps / (time.perf_counter() - started)
    return ceiling


def _transformers_step(model: Any, cache: Any, token: Any) -> Any:
    return model(input_ids=token, past_key_values=cache).logits[:, -1]


PATHS = {
    "transformers": "model forward over a DynamicCache, as serve without continuous batching",
    "neuron": "neuron.model.forward, as neuron serves",
    "neuron-torch": "neuron.model.forward, its decode steps in torch, not the CPU kernel",
}


Sender = Callable[[str], Send]  # the prompt set -> the sender of its requests


@contextlib.asynccontextmanager
async def neuron_server(args: argparse.Namespace, workdir: Path) -> AsyncIterator[Sender]:
    neuron = NeuronProcess(workdir, _neuron_config(args))
    try:
        neuron.start()
        await neuron.wait_serving()
        async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
            stub = pb_grpc.NeuronStub(channel)
            yield lambda prompt_set: grpc_sender(stub, "bench", args.tokens, None, prompt_set)
    finally:
        neuron.stop()


@contextlib.asynccontextmanager
async def cortex_server(args: argparse.Namespace, workdir: Path) -> AsyncIterator[Sender]:
    neuron = NeuronProcess(workdir / "neuron", _neuron_config(args))
    cortex = CortexProcess(workdir / "cortex", cortex_config([neuron]), models=[])
    try:
        neuron.start()
        await neuron.wait_serving()
        cortex.start()
        await cortex.wait_ready()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            yield lambda prompt_set: openai_sender(
                session, cortex.url, "bench", args.tokens, prompt_set
            )
    finally:
        cortex.stop()
        neuron.stop()


def _neuron_config(args: argparse.Namespace) -> dict[str, Any]:
    model = demo_model("bench", dtype=args.dtype)
    return neuron_config([model], max_batch_size=32, cpu_threads=0)


def transformers_server(model_dir: Path, continuous: bool) -> Any:
    def serve(args: argparse.Namespace, workdir: Path) -> Any:
        port = free_port()
        command = [
            str(Path(sys.executable).with_name("transformers")), "serve", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            "--dtype", args.dtype,
            "--continuous-batching" if continuous else "--no-continuous-batching",
        ]  # fmt: skip
        log = workdir / "transformers-serve.log"
        return _openai_process(command, port, "/health", log, str(model_dir), args.tokens)

    return serve


def llama_cpp_server(args: argparse.Namespace, workdir: Path) -> Any:
    """llama-cpp-python's server on the demo GGUF itself: its Q4_1 weights run natively in
    llama.cpp's kernels (no dequantising, so no ``--dtype``), under the GGUF's chat template.

    It holds one sequence and serves one request at a time: a lock queues the rest, and
    ``interrupt_requests`` (on by default) would end the stream in flight, without a finish
    reason, whenever another request waits; it is off here, so concurrent requests wait their
    turn. Its ``Llama`` has no parallel slots or continuous batching for generation (the
    ``n_seq_max`` it sets is for embeddings only; llama.cpp's own C++ ``llama-server`` has them,
    and is not what this runs), so ``n_ctx`` needs to hold one request, not 16. Threads
    (``--llama-threads``): the cores less one, left to its Python server and the client: its
    threads spin at every barrier of a step, and one of them preempted stalls the step (on 2
    cores, 1 thread served 1.2-1.4x the tokens/s of 2, steadier, at the same TTFT). Logits of
    the last position only (the server's default keeps every prompt position's, for ``echo``).
    Greedy as every server, its default ``repeat_penalty`` of 1.1 turned off (the others apply
    none). It streams no usage, so its tokens are counted by ``bench.loadgen`` (``length``: all
    of ``max_tokens``).
    """
    port = free_port()
    threads = str(args.llama_threads or max(1, len(os.sched_getaffinity(0)) - 1))
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(DEMO_GGUF),
        "--host", "127.0.0.1", "--port", str(port),
        "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "2048",
        "--chat_format", "chat_template.default", "--interrupt_requests", "false",
        "--logits_all", "false", "--verbose", "false",
    ]  # fmt: skip
    log = workdir / "llama-cpp-server.log"
    extra = {"repeat_penalty": 1.0}
    return _openai_process(command, port, "/v1/models", log, "demo", args.tokens, extra)


@contextlib.asynccontextmanager
async def _openai_process(
    command: list[str],
    port: int,
    ready_path: str,
    log_path: Path,
    model: str,
    max_tokens: int,
    extra: dict[str, Any] | None = None,
) -> AsyncIterator[Sender]:
    """A server process with an OpenAI chat API on ``port``: ready when ``ready_path`` answers
    200, stopped on leaving."""
    proc, log = _start(command, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{log_path.stem} did not start; see {log_path}")
                try:
                    async with session.get(f"{base}{ready_path}") as reply:
                        if reply.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
            yield lambda prompt_set: openai_sender(
                session, base, model, max_tokens, prompt_set, extra
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


Key = tuple[str, str, int]  # prompt set, server, streams


async def measure_rounds(
    args: argparse.Namespace, servers: list[tuple[str, Any]], workdir: Path
) -> dict[Key, list[Summary]]:
    """Each server started afresh per round, one at a time, the rounds interleaving them;
    within a start, a warm-up, then each prompt set at each concurrency."""
    runs: dict[Key, list[Summary]] = {}
    for round_ in range(args.rounds):
        for number, (name, server) in enumerate(servers):
            async with server(args, workdir / f"{number}-{round_}") as sender:
                # First requests pay for lazy initialisation, and each stream's connection
                # is opened here, not in its first measured request (clients keep theirs).
                await closed_loop(sender("shared"), max(args.concurrency), 1, f"w{round_}")
                for prompt_set in PROMPT_SETS:
                    send = sender(prompt_set)
                    for streams in args.concurrency:
                        tag = f"{round_}-{streams}"  # the same requests for every server
                        summary = await closed_loop(send, streams, args.per_stream, tag)
                        runs.setdefault((prompt_set, name, streams), []).append(summary)
    return runs


def rounds_table(runs: dict[Key, list[Summary]]) -> str:
    lines = [
        "| prompts | server | streams | tok/s median (range) | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms | tokens/request | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (prompt_set, name, streams), summaries in runs.items():
        rates = [s.tokens_per_second for s in summaries]
        ttfts = [t for s in summaries for t in s.ttfts]
        gaps = [g for s in summaries for g in s.gaps]
        requests = sum(s.requests for s in summaries)
        tokens = sum(s.tokens for s in summaries)
        errors = sum(len(s.errors) for s in summaries)
        rate, ttft_p50 = _medians(summaries)
        itl_p50 = statistics.median([percentile(s.gaps, 50) for s in summaries])
        lines.append(
            f"| {prompt_set} | {name} | {streams} | {rate:.1f} "
            f"({min(rates):.1f}-{max(rates):.1f}) | {1000 * ttft_p50:.0f} | {_p99(ttfts)} "
            f"| {1000 * itl_p50:.1f} | {_p99(gaps)} | {tokens / max(requests, 1):.1f} "
            f"| {errors or ''} |"
        )
    return "\n".join(lines)


def _medians(summaries: list[Summary]) -> tuple[float, float]:
    """Tokens/s and TTFT p50 (s): each the median over the rounds."""
    rate = statistics.median([s.tokens_per_second for s in summaries])
    return rate, statistics.median([percentile(s.ttfts, 50) for s in summaries])


def peer_ratios(runs: dict[Key, list[Summary]], peer: str, servers: list[str]) -> list[str]:
    """Each of ``servers`` against ``peer`` at 1 and 8 streams: tokens/s and TTFT p50 as
    ratios of the medians in the table (above 1: more tokens/s, a later first token)."""
    lines = []
    for (prompt_set, name, streams), summaries in runs.items():
        theirs = runs.get((prompt_set, peer, streams))
        if name not in servers or streams not in (1, 8) or not theirs:
            continue
        (rate, ttft), (peer_rate, peer_ttft) = _medians(summaries), _medians(theirs)
        lines.append(
            f"{name} / {peer}, {prompt_set} prompts, {streams} streams: "
            f"tok/s {rate / peer_rate:.2f}x, TTFT p50 {ttft / peer_ttft:.2f}x"
        )
    return lines


def _p99(samples: list[float]) -> str:
    """The p99 in ms where there are samples enough to have one."""
    return f"{1000 * percentile(samples, 99):.0f}" if len(samples) >= 100 else "-"


def _start(command: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log


SERVERS = ("neuron", "cortex", "transformers-cb", "transformers", "llama.cpp")
ENGINES = {  # the bare step each server's figures sit under
    "neuron": "neuron",
    "cortex": "neuron",
    "transformers-cb": "transformers",
    "transformers": "transformers",
}
NEURON, CORTEX, LLAMA_CPP = "neuron (gRPC)", "cortex → neuron", "llama.cpp (Q4_1)"


async def run(args: argparse.Namespace) -> tuple[str, int]:
    from neuron.sources import materialise_gguf

    model_dir = materialise_gguf(DEMO_GGUF, SHARED_CACHE)
    workdir = Path(tempfile.mkdtemp(prefix="helexa-bench-generation-"))
    commit = head_commit()
    keys = [
        key
        for key in args.servers
        if not (args.skip_transformers and ENGINES.get(key) == "transformers")
    ]
    weights = "; llama.cpp: the GGUF's Q4_1 weights, natively" if "llama.cpp" in keys else ""
    out = [
        f"commit {commit}; dtype {args.dtype}{weights}; {args.rounds} rounds; {args.tokens} "
        f"tokens a request, {args.per_stream} requests a stream"
    ]
    every: dict[str, tuple[str, Any]] = {
        "neuron": (NEURON, neuron_server),
        "cortex": (CORTEX, cortex_server),
        "transformers-cb": (
            "transformers serve --continuous-batching",
            transformers_server(model_dir, True),
        ),
        "transformers": ("transformers serve", transformers_server(model_dir, False)),
        "llama.cpp": (LLAMA_CPP, llama_cpp_server),
    }
    servers = [every[key] for key in keys]
    try:
        for engine in PATHS:
            if engine.removesuffix("-torch") not in {ENGINES.get(key) for key in keys}:
                continue
            ceiling = bare_step_ceiling(model_dir, args.concurrency, engine, args.dtype)
            path = PATHS[engine]
            out.append(
                f"bare forward step ({engine}: {path}; {args.dtype}), tok/s: "
                + ", ".join(f"{b} streams {v:.0f}" for b, v in ceiling.items())
            )
        runs = await measure_rounds(args, servers, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out.append(rounds_table(runs))
    ratios = peer_ratios(runs, LLAMA_CPP, [NEURON, CORTEX])
    if ratios:
        out.append("\n".join(ratios))
    failed = [e for summaries in runs.values() for s in summaries for e in s.errors]
    if failed:
        out.append(f"{len(failed)} requests FAILED, e.g.: {failed[0]}")
    return "\n\n".join(out), len(failed)


def _server_keys(text: str) -> list[str]:
    keys = text.split(",")
    unknown = [key for key in keys if key not in SERVERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(SERVERS)}")
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--concurrency", default="1,4,8,16", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--per-stream", type=int, default=2, help="requests each stream sends")
    parser.add_argument("--rounds", type=int, default=3, help="each server's runs, interleaved")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        type=_server_keys,
        help=f"which servers, comma-separated (default: all of {','.join(SERVERS)})",
    )
    parser.add_argument("--skip-transformers", action="store_true", help="drop both transformers")
    parser.add_argument(
        "--llama-threads", type=int, default=0, help="llama.cpp's (default: the cores less one)"
    )
    report, failed = asyncio.run(run(parser.parse_args()))
    print(report)
    if failed:
        raise SystemExit("requests failed: the figures above are not to be trusted")


if __name__ == "__main__":
    main()
