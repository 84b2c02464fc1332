"""The paged KV cache: memory by the token, and its decode step against the padded cache it
replaced.

Memory: --streams (64) concurrent streams of the demo model (SmolLM2-135M-Instruct) with
prompts of mixed lengths up to the context (--context), prefilled in groups of 8 and then
decoding --tokens tokens together, through the engine's ``Runner``. Two workloads: ``mixed``
(every prompt its own random tokens) and ``shared`` (every prompt begins with the same
--shared tokens, as a fleet of agents with one system prompt). Printed: the peak of the
blocks the rows held, against the sum of their tokens' KV bytes at that step, against what
the padded cache would have held for the same rows (each row as long as the longest, plus
the 64 columns it grew by), and the pool's resident memory at the end (the pool is
allocated whole but untouched: a block's pages are taken when it is first written, and a
block let go is handed out again before a fresh one).

Speed: the bare decode step (no server, no sampling) at --rows (16) rows, contexts of 64 and
--long tokens, of this checkout and of --baseline (the last commit with the padded cache),
each measured in a process of its own from a worktree of its commit, rounds interleaved.

    .venv/bin/python -m bench.kvcache [--streams 64] [--context 2048] [--tokens 32]
        [--rows 16] [--long 1024] [--rounds 3] [--baseline 1c15778]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The last commit whose engine ran the padded cache (rows left-padded to the longest).
BASELINE = "1c15778"


def _resident(address: int) -> int:
    """Resident bytes of the mapping of this process that holds ``address`` (the pool's: an
    allocation that large is a mapping of its own)."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start <= address < end
        elif inside and first == "Rss:":
            resident = int(line.split()[1]) * 1024
    return resident


def load_forward(model_dir: Path, dtype_name: str, kernel: bool = True) -> Any:
    """The demo model's forward, as the neuron builds it (its decode steps on the 4-bit
    codes; without ``kernel``, in torch). Works with this checkout's ``neuron`` and the
    baseline's."""
    import torch
    from transformers import AutoModelForCausalLM

    from neuron.model import quant
    from neuron.model.forward import Forward

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    if hasattr(quant, "load_int8"):
        head8 = quant.load_int8(model_dir).get("lm_head")
        return Forward(model, quant.load_int4(model_dir), True, kernel, head8)
    use_int4 = quant.int4_kernel_usable(torch.device("cpu"), dtype)  # a baseline's neuron
    return Forward(model, quant.load_int4(model_dir) if use_int4 else {}, use_int4)


def memory(args: argparse.Namespace, model_dir: Path, workload: str) -> dict[str, Any]:
    """Run ``args.streams`` streams through a ``Runner`` and measure what their cache held."""
    import torch

    from neuron.engine.blocks import pool_blocks
    from neuron.engine.runner import Runner
    from neuron.engine.sequence import SamplingParams, Sequence
    from neuron.model.forward import BLOCK, kv_elements_per_token

    forward = load_forward(model_dir, args.dtype)
    config = json.loads((model_dir / "config.json").read_text())
    element = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    token_bytes = kv_elements_per_token(argparse.Namespace(**config)) * element
    rng = random.Random(f"{args.seed}-{workload}")
    shared = [rng.randrange(1000, 40000) for _ in range(args.shared)]
    prompts = []
    for _ in range(args.streams):
        length = rng.randrange(args.shared + 16, args.context - args.tokens)
        head = shared if workload == "shared" else []
        prompts.append(head + [rng.randrange(1000, 40000) for _ in range(length - len(head))])
    blocks = pool_blocks(0, args.streams, args.context)
    # No idle blocks kept: what the rows share they hold; nothing else counts.
    runner = Runner("bench", forward, torch.device("cpu"), 0, blocks, 1 << 40)
    runner.blocks.cache_blocks = 0 if workload == "mixed" else runner.blocks.cache_blocks
    seqs = [
        Sequence(str(i), p, SamplingParams(max_tokens=args.tokens), print, None)  # type: ignore[arg-type]
        for i, p in enumerate(prompts)
    ]
    peak = {"held": 0, "tokens": 0, "longest": 0}

    def look() -> None:
        if runner.blocks.held > peak["held"]:
            lengths = [len(s.prompt_ids) + len(s.generated) for s in seqs[: runner.rows]]
            peak.update(held=runner.blocks.held, tokens=sum(lengths), longest=max(lengths))

    with torch.inference_mode():
        started = time.perf_counter()
        for first in range(0, len(seqs), 8):
            logits = runner.prefill(seqs[first : first + 8])
            runner.accept(first, logits.argmax(-1))
            for seq, token in zip(seqs[first : first + 8], logits.argmax(-1).tolist(), strict=True):
                seq.generated.append(token)
            look()
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(args.tokens - 1):
            tokens = runner.decode().argmax(-1)
            runner.accept(0, tokens)
            for seq, token in zip(seqs, tokens.tolist(), strict=True):
                seq.generated.append(token)
            look()
        decode_s = time.perf_counter() - started
    resident = _resident(runner.pool.data.data_ptr())
    block_bytes = BLOCK * token_bytes
    padded = args.streams * (peak["longest"] + 64) * token_bytes
    return {
        "workload": workload,
        "streams": args.streams,
        "tokens": peak["tokens"],
        "held": peak["held"] * block_bytes,
        "needed": peak["tokens"] * token_bytes,
        "padded": padded,
        "reserved": (blocks - 1) * block_bytes,
        "resident": resident,
        "prefill_tps": sum(len(p) for p in prompts) / prefill_s,
        "decode_tps": args.streams * (args.tokens - 1) / decode_s,
    }


def paged_step(forward: Any, prompt: Any, room: int) -> Callable[[Any], Any]:
    """The engine's runner over its paged cache (no prefix cache), prefilled with the rows of
    ``prompt`` [rows, tokens] with room for ``room`` more tokens each: its decode step, given
    each row's next token [rows, 1]."""
    import torch

    from neuron.engine.blocks import needed
    from neuron.engine.runner import Runner
    from neuron.engine.sequence import SamplingParams, Sequence

    rows, tokens = prompt.shape
    blocks = rows * needed(tokens + room) + 1
    runner = Runner("bench", forward, torch.device("cpu"), 0, blocks, 0)
    seqs = [
        Sequence(str(i), row, SamplingParams(max_tokens=room), print, None)  # type: ignore[arg-type]
        for i, row in enumerate(prompt.tolist())
    ]
    for first in range(0, rows, 4):
        runner.prefill(seqs[first : first + 4])

    def step(token: Any) -> Any:
        runner.accept(0, token[:, 0])
        return runner.decode()

    return step


def step_rate(model_dir: Path, rows: int, context: int, dtype_name: str, steps: int) -> float:
    """Tokens/s of the bare decode step at ``rows`` rows of ``context`` tokens, with this
    process's ``neuron`` (this checkout's paged cache, or the baseline's padded one)."""
    import torch

    from neuron.model import forward as module

    forward = load_forward(model_dir, dtype_name)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 40000, (rows, context), generator=generator)
    with torch.inference_mode():
        if hasattr(module, "KVCache"):  # the padded cache: one row per sequence
            cache = module.KVCache.empty(forward, rows, context + steps + 8)
            positions = torch.arange(context).expand(rows, context)
            forward(prompt, positions, torch.ones(rows, context, dtype=torch.long), cache)

            def step(token: torch.Tensor) -> torch.Tensor:
                mask = torch.ones(rows, cache.length + 1, dtype=torch.long)
                return forward(token, torch.full((rows, 1), cache.length), mask, cache)
        else:
            step = paged_step(forward, prompt, steps + 8)

        token = torch.randint(1000, 40000, (rows, 1), generator=generator)
        for _ in range(3):  # warm up
            token = step(token).argmax(-1, keepdim=True)
        started = time.perf_counter()
        for _ in range(steps):
            token = step(token).argmax(-1, keepdim=True)
        return rows * steps / (time.perf_counter() - started)


def _measure_in(checkout: Path, model_dir: Path, rows: int, context: int, args: Any) -> float:
    """``step_rate`` in a process of its own, importing ``neuron`` from ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    call = [
        sys.executable, str(Path(__file__).resolve()), "--step", str(model_dir),
        str(rows), str(context), args.dtype, str(args.steps),
    ]  # fmt: skip
    done = subprocess.run(call, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"step in {checkout} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def speed(args: argparse.Namespace, model_dir: Path) -> dict[tuple[str, int], list[float]]:
    worktree = Path(tempfile.mkdtemp(prefix="helexa-bench-kvcache-")) / "baseline"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(worktree), args.baseline],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for context in (64, args.long):
                for name, checkout in (("padded", worktree), ("paged", ROOT)):
                    rate = _measure_in(checkout, model_dir, args.rows, context, args)
                    rates.setdefault((name, context), []).append(rate)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT)
    return rates


def report(args: argparse.Namespace, mem: list[dict[str, Any]], rates: Any) -> str:
    from bench.loadgen import head_commit

    mib = 1 << 20
    lines = [
        f"commit {head_commit()}, baseline {args.baseline}, {os.cpu_count()} CPUs, "
        f"{args.dtype}, SmolLM2-135M-Instruct",
        "",
        f"Memory: {args.streams} streams, prompts of 16 to {args.context - args.tokens} tokens"
        f" (shared: the first {args.shared} the same), {args.tokens} tokens decoded",
        "",
        "| workload | tokens at peak | their KV MiB | blocks held MiB | held / tokens' "
        "| padded cache MiB | padded / held | pool resident MiB | pool reserved MiB "
        "| prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in mem:
        lines.append(
            f"| {m['workload']} | {m['tokens']:,} | {m['needed'] / mib:,.0f} "
            f"| {m['held'] / mib:,.0f} | {m['held'] / m['needed']:.2f} "
            f"| {m['padded'] / mib:,.0f} | {m['padded'] / m['held']:.2f} "
            f"| {m['resident'] / mib:,.0f} | {m['reserved'] / mib:,.0f} "
            f"| {m['prefill_tps']:,.0f} | {m['decode_tps']:,.1f} |"
        )
    if rates:
        lines += [
            "",
            f"Bare decode step, {args.rows} rows, tokens/s (median of {args.rounds}, range):",
            "",
            "| context | padded (baseline) | paged | paged / padded |",
            "|---|---|---|---|",
        ]
        for context in (64, args.long):
            padded, paged = rates[("padded", context)], rates[("paged", context)]
            lines.append(
                f"| {context} | {_cell(padded)} | {_cell(paged)} "
                f"| {statistics.median(paged) / statistics.median(padded):.2f} |"
            )
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def main() -> None:
    if sys.argv[1:2] == ["--step"]:  # one measurement, in the checkout's own process
        model_dir, rows, context, dtype, steps = sys.argv[2:7]
        print(step_rate(Path(model_dir), int(rows), int(context), dtype, int(steps)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--shared", type=int, default=512)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--long", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", default="kvcache")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    from neuron.sources import materialise_gguf
    from tests.harness import DEMO_GGUF, SHARED_CACHE

    model_dir = materialise_gguf(DEMO_GGUF, SHARED_CACHE)
    mem = [memory(args, model_dir, workload) for workload in ("mixed", "shared")]
    rates = None if args.skip_speed else speed(args, model_dir)
    print(report(args, mem, rates))


if __name__ == "__main__":
    main()
