"""Generation benchmark: SmolLM2-135M-Instruct on the CPU, chat requests of 64 output tokens
at 1, 4, 8 and 16 concurrent streams, against each server in turn in one run:

- the bare forward step, KV cache of ~64 tokens, of transformers' forward and of neuron's
  (the ceiling of the engine: what a step costs with no server, sampling or streaming);
- neuron over gRPC, and cortex → neuron over HTTP (what clients use);
- ``transformers serve`` on the same materialised model files, with and without
  ``--continuous-batching``.

    .venv/bin/python -m bench.generation [--concurrency 1,4,8,16] [--tokens 64]

Servers run one at a time so they never compete for the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import aiohttp
import grpc

from bench.loadgen import Summary, closed_loop, grpc_sender, openai_sender, table
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

    ``engine`` is "transformers" (its own forward, what ``transformers serve`` runs) or
    "neuron" (neuron's forward, with the int4 codes where the CPU kernel pays).
    """
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from neuron.model.forward import Forward, KVCache
    from neuron.model.quant import int4_kernel_usable, load_int4

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    if engine == "neuron":
        use_int4 = int4_kernel_usable(torch.device("cpu"), dtype)
        forward = Forward(model, load_int4(model_dir) if use_int4 else {}, use_int4)
    ceiling = {}
    with torch.inference_mode():
        for batch in batches:
            prompt = torch.randint(0, 1000, (batch, 64))
            if engine == "neuron":
                cache = KVCache.empty(forward, batch, 128)
                positions = torch.arange(64).expand(batch, 64)
                forward(prompt, positions, torch.ones(batch, 64, dtype=torch.long), cache)
                step = functools.partial(_neuron_step, forward, cache)
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


def _neuron_step(forward: Any, cache: Any, token: Any) -> Any:
    import torch

    rows = token.shape[0]
    mask = torch.ones(rows, cache.length + 1, dtype=torch.long)
    return forward(token, torch.full((rows, 1), cache.length), mask, cache)


def _transformers_step(model: Any, cache: Any, token: Any) -> Any:
    return model(input_ids=token, past_key_values=cache).logits[:, -1]


async def measure(send_factory, concurrency: list[int], per_stream: int) -> list[Summary]:  # type: ignore[no-untyped-def]
    send = send_factory()
    # Warm up: first requests pay for lazy initialisation, and each stream's connection is
    # opened here, not in its first measured request (clients keep theirs open).
    await closed_loop(send, max(concurrency), 1)
    return [await closed_loop(send, c, per_stream) for c in concurrency]


async def bench_neuron(
    concurrency: list[int], tokens: int, per_stream: int, workdir: Path
) -> list[Summary]:
    neuron = NeuronProcess(
        workdir / "neuron", neuron_config([demo_model("bench")], max_batch_size=32, cpu_threads=0)
    )
    try:
        neuron.start()
        await neuron.wait_serving()
        async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
            stub = pb_grpc.NeuronStub(channel)
            return await measure(
                lambda: grpc_sender(stub, "bench", tokens), concurrency, per_stream
            )
    finally:
        neuron.stop()


async def bench_cortex(
    concurrency: list[int], tokens: int, per_stream: int, workdir: Path
) -> list[Summary]:
    neuron = NeuronProcess(
        workdir / "neuron-c", neuron_config([demo_model("bench")], max_batch_size=32, cpu_threads=0)
    )
    cortex = CortexProcess(workdir / "cortex", cortex_config([neuron]), models=[])
    try:
        neuron.start()
        await neuron.wait_serving()
        cortex.start()
        await cortex.wait_ready()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            return await measure(
                lambda: openai_sender(session, cortex.url, "bench", tokens),
                concurrency,
                per_stream,
            )
    finally:
        cortex.stop()
        neuron.stop()


async def bench_transformers_serve(
    model_dir: Path,
    continuous: bool,
    concurrency: list[int],
    tokens: int,
    per_stream: int,
    workdir: Path,
) -> list[Summary]:
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("transformers")), "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "bfloat16",
        "--continuous-batching" if continuous else "--no-continuous-batching",
    ]  # fmt: skip
    proc, log = _start(command, workdir / f"transformers-serve-{continuous}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"transformers serve did not start; see {log.name}")
                try:
                    async with session.get(f"{base}/health") as reply:
                        if reply.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
            return await measure(
                lambda: openai_sender(session, base, str(model_dir), tokens),
                concurrency,
                per_stream,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _start(command: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    log = open(log_path, "wb")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log


async def run(args: argparse.Namespace) -> str:
    from neuron.sources import materialise_gguf

    model_dir = materialise_gguf(DEMO_GGUF, SHARED_CACHE)
    workdir = Path(tempfile.mkdtemp(prefix="helexa-bench-generation-"))
    rows: list[tuple[str, Summary]] = []
    out = []
    try:
        for engine in ("transformers", "neuron"):
            ceiling = bare_step_ceiling(model_dir, args.concurrency, engine, "bfloat16")
            out.append(
                f"bare forward step ({engine}, bfloat16), tok/s: "
                + ", ".join(f"{b} streams {v:.0f}" for b, v in ceiling.items())
            )
        for name, summaries in [
            (
                "neuron (gRPC)",
                await bench_neuron(args.concurrency, args.tokens, args.per_stream, workdir),
            ),
            (
                "cortex → neuron",
                await bench_cortex(args.concurrency, args.tokens, args.per_stream, workdir),
            ),
            (
                "transformers serve --continuous-batching",
                await bench_transformers_serve(
                    model_dir, True, args.concurrency, args.tokens, args.per_stream, workdir
                )
                if not args.skip_transformers
                else None,
            ),
            (
                "transformers serve",
                await bench_transformers_serve(
                    model_dir, False, args.concurrency, args.tokens, args.per_stream, workdir
                )
                if not args.skip_transformers
                else None,
            ),
        ]:
            if summaries:
                rows.extend((name, s) for s in summaries)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out.append(table(rows))
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--concurrency", default="1,4,8,16", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--per-stream", type=int, default=2, help="requests each stream sends")
    parser.add_argument("--skip-transformers", action="store_true")
    print(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
