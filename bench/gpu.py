"""The GPU check: the CUDA tests, then generation speed on the device, in one table.

Run by ``make gpu-check`` (scripts/gpu-check) on a host with a CUDA device, in about five
minutes on an H200:

- the CUDA tests (tests/test_cuda.py: memory back to its baseline after an unload, two models
  on one device, a model larger than free memory refused before it allocates, greedy decoding
  on CUDA equal to the CPU's in float32);
- the device's memory bandwidth, from a large device-to-device copy (bytes read and written);
- for two random-weight models of published shapes (Qwen2.5-0.5B and -1.5B, bf16, the demo
  tokenizer), tokens/s and time to first token at 1, 8, 32 and 64 concurrent streams through
  a real ``neuron serve`` over gRPC, against transformers' ``generate`` (a static batch of as
  many prompts) and its continuous batching (``generate_batch``, where the installed
  transformers has it), each beside the memory-bandwidth limit: every decode step reads every
  weight once, so a step takes at least weight bytes / bandwidth (KV cache reads left out).

Without a CUDA device it says so and exits 0. Exits 1 when a test or a stage failed.

    python -m bench.gpu [--streams 1,8,32,64] [--tokens 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench.loadgen import PROMPTS, Summary, closed_loop, grpc_sender
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import ROOT, NeuronProcess, neuron_config
from tests.random_models import BUILT, build

BENCHED = ("qwen2.5-0.5b", "qwen2.5-1.5b")
MAX_CONTEXT = 2048


class Report:
    """What the check found, printed as it goes (a run cut short still shows its stages)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.rows: list[tuple[str, str, Summary, float]] = []
        self.failed: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def stage(self, name: str, run: Callable[[], Any], within: float = 600.0) -> Any:
        """``run()``, or None if it raised or took more than ``within`` seconds (it is then
        left running on a daemon thread, and the check goes on without it)."""
        started = time.monotonic()
        outcome: list[Any] = []

        def target() -> None:
            try:
                outcome.append(run())
            except Exception:
                outcome.append(traceback.format_exc())
                outcome.append(None)

        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        thread.join(within)
        if not outcome:
            self.failed.append(name)
            self.say(f"{name}: FAILED: still running after {within:.0f} s")
            return None
        if len(outcome) == 2:
            self.failed.append(name)
            self.say(f"{name}: FAILED\n{outcome[0]}")
            return None
        self.say(f"{name}: done in {time.monotonic() - started:.0f} s")
        return outcome[0]

    def table(self) -> str:
        lines = [
            "| model | server | streams | tok/s | ttft p50 ms | ttft p99 ms | itl p50 ms "
            "| tokens/request | bandwidth limit tok/s | of limit |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for model, server, s, limit in self.rows:
            row = s.row()
            lines.append(
                f"| {model} | {server} | {s.concurrency} | {row['tok/s']:.0f} "
                f"| {row['ttft p50 ms']:.1f} | {row['ttft p99 ms']:.1f} | {row['itl p50 ms']:.1f} "
                f"| {row['tokens/request']:.0f} | {limit:.0f} | {row['tok/s'] / limit:.0%} |"
            )
        return "\n".join(lines)


def run_cuda_tests(report: Report, log: Path) -> None:
    """tests/test_cuda.py in its own process; its summary line goes into the report."""
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
             "tests/test_cuda.py"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=420,
        )  # fmt: skip
    text = log.read_text(errors="replace")
    summary = text.strip().splitlines()[-1] if text.strip() else "no output"
    report.say(f"CUDA tests: {summary.strip('= ')}")
    if result.returncode != 0 or re.search(r"\b(failed|error)", summary):
        report.failed.append("CUDA tests")
        report.say("\n".join(text.splitlines()[-60:]))


def copy_bandwidth(gib: int = 4) -> float:
    """Bytes/s of a device-to-device copy of ``gib`` GiB, counting bytes read and written."""
    import torch

    src = torch.randint(0, 255, (gib << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (gib << 30) / sorted(times)[len(times) // 2]


def chat_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """The load generator's prompts, rendered with the chat template as neuron renders them."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Request {i}: {PROMPTS[i % len(PROMPTS)]}"}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for i in range(count)
    ]


async def bench_neuron(
    report: Report,
    models: dict[str, Path],
    streams: list[int],
    tokens: int,
    workdir: Path,
    device: str = "cuda:0",
) -> dict[str, list[Summary]]:
    """Both models in one ``neuron serve`` on ``device``, each measured over gRPC in turn."""
    config = neuron_config(
        [
            {"id": name, "path": str(path), "device": device, "max_context": MAX_CONTEXT}
            for name, path in models.items()
        ],
        max_batch_size=max(streams),
        loading={"local_dirs": [str(BUILT)]},
    )
    config["devices"] = {**config["devices"], "use": [device], "cuda_memory_reserve": "4GiB"}
    neuron = NeuronProcess(workdir / "neuron", config)
    results = {}
    try:
        neuron.start()
        await neuron.wait_serving(within=300)
        async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
            stub = pb_grpc.NeuronStub(channel)
            for name in models:
                send = grpc_sender(stub, name, tokens)
                await closed_loop(send, max(streams), 1)  # warm-up: lazy set-up, channels
                results[name] = [await closed_loop(send, c, 1) for c in streams]
                failed = [e for summary in results[name] for e in summary.errors]
                if failed:
                    report.failed.append(f"{name} over gRPC")
                    report.say(f"{name}: {len(failed)} requests FAILED, e.g. {failed[0]}")
    finally:
        neuron.stop()
        report.say("neuron log (end):\n" + "\n".join(neuron.log().splitlines()[-8:]))
    return results


def bench_generate(model: Any, tokenizer: Any, streams: list[int], tokens: int) -> list[Summary]:
    """transformers' ``generate`` over a static, left-padded batch of ``streams`` prompts:
    time to first token is a one-token ``generate`` of the same batch."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    summaries = []
    for batch in [1, *streams]:  # the first pass warms up
        prompts = chat_prompts(tokenizer, batch)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device
        )
        ttft = _timed_generate(model, ids, mask, pad, 1)
        seconds = _timed_generate(model, ids, mask, pad, tokens)
        summaries.append(Summary(batch, batch, batch * tokens, seconds, ttfts=[ttft] * batch))
    return summaries[1:]


def _timed_generate(model: Any, ids: Any, mask: Any, pad: int, new: int) -> float:
    """Seconds ``generate`` takes to add exactly ``new`` tokens to each row, greedily."""
    import torch

    sync = torch.cuda.synchronize if model.device.type == "cuda" else lambda: None
    sync()
    started = time.perf_counter()
    model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
        do_sample=False, pad_token_id=pad,
    )  # fmt: skip
    sync()
    return time.perf_counter() - started


def bench_generate_batch(
    model: Any, tokenizer: Any, streams: list[int], tokens: int
) -> list[Summary]:
    """transformers' continuous batching (``generate_batch``): all prompts submitted at once;
    time to first token from its per-token timestamps."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id
    )
    summaries = []
    for batch in [1, *streams]:
        prompts = chat_prompts(tokenizer, batch)
        started = time.perf_counter()
        outputs = model.generate_batch(
            inputs=prompts, generation_config=config, record_timestamps=True
        )
        seconds = time.perf_counter() - started
        done = list(outputs.values())
        ttfts = [o.timestamps[0] - o.created_time for o in done if getattr(o, "timestamps", None)]
        produced = sum(len(o.generated_tokens) for o in done)
        summaries.append(Summary(batch, len(done), produced, seconds, ttfts=ttfts))
    return summaries[1:]


def bench_transformers(
    report: Report, models: dict[str, Path], streams: list[int], tokens: int
) -> dict[str, dict[str, list[Summary]]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results: dict[str, dict[str, list[Summary]]] = {}
    for name, path in models.items():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.bfloat16, device_map="cuda:0"
        ).eval()
        results[name] = {}
        with torch.inference_mode():
            found = report.stage(
                f"transformers generate, {name}",
                functools.partial(bench_generate, model, tokenizer, streams, tokens),
                within=120,
            )
            if found:
                results[name]["transformers generate"] = found
            if hasattr(model, "generate_batch"):
                found = report.stage(
                    f"transformers generate_batch, {name}",
                    functools.partial(bench_generate_batch, model, tokenizer, streams, tokens),
                    within=120,
                )
                if found:
                    results[name]["transformers generate_batch"] = found
            else:
                report.say("transformers generate_batch: not in this transformers; left out")
        del model
        torch.cuda.empty_cache()
    return results


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no GPU here (torch.cuda.is_available() is false): nothing to check")
        return 0
    import transformers

    report = Report()
    props = torch.cuda.get_device_properties(0)
    report.say(
        f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="helexa-gpu-check-"))
    models = report.stage(
        "models built", lambda: {name: build(name, device="cuda") for name in BENCHED}
    )
    report.stage("CUDA tests", lambda: run_cuda_tests(report, workdir / "pytest.log"))
    bandwidth = report.stage("bandwidth", copy_bandwidth)
    if bandwidth:
        report.say(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + written)")
    if models and bandwidth:
        from neuron.sources import parameter_bytes

        weights = {name: parameter_bytes(path, 2) for name, path in models.items()}
        served = report.stage(
            "neuron over gRPC",
            lambda: asyncio.run(bench_neuron(report, models, args.streams, args.tokens, workdir)),
        )
        baselines = report.stage(
            "transformers", lambda: bench_transformers(report, models, args.streams, args.tokens)
        )
        for name in models:
            servers = {"neuron (gRPC)": (served or {}).get(name, [])}
            servers.update((baselines or {}).get(name, {}))
            for server, summaries in servers.items():
                for s in summaries:
                    limit = s.concurrency * bandwidth / weights[name]
                    report.rows.append((name, server, s, limit))
        report.say(
            "weights: "
            + ", ".join(f"{n} {b / 1e9:.2f} GB" for n, b in weights.items())
            + f"; {args.tokens} tokens a request"
        )
    report.say(report.table())
    verdict = f"FAILED: {', '.join(report.failed)}" if report.failed else "passed"
    report.say(f"gpu-check {verdict}")
    if args.out:
        args.out.write_text("\n".join(report.lines) + "\n")
    sys.stdout.flush()
    # A stage left running (see Report.stage) must not hold the exit.
    os._exit(1 if report.failed else 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--streams", default="1,8,32,64", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--tokens", type=int, default=128, help="tokens each request generates")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
