"""Gateway cost: cortex in front of a stand-in neuron that streams instantly, against calling
the stand-in directly over gRPC. cortex is pinned to one core (taskset), the load and the
stand-in to the other, so the figures are what one cortex process does on one core.

    .venv/bin/python -m bench.gateway [--seconds 10]

Each figure twice, with two stand-ins. The first produces a stream's tokens back to back
(``--tokens-per-message 1``: a message each for a ``Generate`` caller); over ``GenerateMany``,
as cortex asks, its session merges them into one event. The second produces one token per
event-loop turn for every running stream, as neuron's decode steps do, and sends each time
it can: then a message carries about one token of every stream, and each token is an event
and an SSE write of its own, the gateway's worst case.

- added latency: non-streaming chat requests of 16 tokens, one at a time, p50/p99;
- requests/s: non-streaming requests at concurrency 1 and 64 (wrk), and at 64 through
  ``bench.bare_relay`` on the same core: a bare aiohttp handler making a grpc.aio call per
  request, what cortex did before ``GenerateMany``;
- streamed tokens/s: 256-token SSE streams at concurrency 1 and 64 (wrk), and at 64 through
  ``/v1/responses`` (its event sequence, each response kept) and Anthropic's ``/v1/messages``
  (its event sequence), against chat completions'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc

from bench.loadgen import percentile
from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import CortexProcess, cortex_config, free_port

CORTEX_CORE, LOAD_CORE = "0", "1"


@dataclass
class Endpoint:
    endpoint: str


def body(max_tokens: int, stream: bool) -> dict[str, object]:
    return {
        "model": "standin",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def responses_body(max_tokens: int, stream: bool) -> dict[str, object]:
    """The same request through /v1/responses (kept, as by default)."""
    return {"model": "standin", "input": "Hello", "max_output_tokens": max_tokens, "stream": stream}


async def latency_direct(endpoint: str, n: int) -> list[float]:
    samples = []
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = pb_grpc.NeuronStub(channel)
        message = pb.ChatMessage(role="user", content="Hello")
        request = pb.GenerateRequest(  # as cortex asks for a non-streaming answer
            model="standin",
            chat=pb.ChatMessages(messages=[message]),
            max_tokens=16,
            message_interval=60.0,
        )
        for i in range(n + 50):
            started = time.perf_counter()
            async for _ in stub.Generate(request, timeout=10):
                pass
            if i >= 50:  # warm-up
                samples.append(time.perf_counter() - started)
    return samples


async def latency_cortex(url: str, n: int) -> list[float]:
    samples = []
    async with aiohttp.ClientSession() as session:
        for i in range(n + 50):
            started = time.perf_counter()
            async with session.post(f"{url}/v1/chat/completions", json=body(16, False)) as reply:
                await reply.read()
                assert reply.status == 200, reply.status
            if i >= 50:
                samples.append(time.perf_counter() - started)
    return samples


def wrk(
    url: str, payload: dict[str, object], connections: int, seconds: int, workdir: Path
) -> float:
    """Requests per second wrk sustains against ``url`` with ``payload`` as a POST body."""
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(json.dumps(payload))}\n"
    )
    out = subprocess.run(
        [
            "taskset",
            "-c",
            LOAD_CORE,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def pin(pid: int, core: str) -> None:
    """Pin every thread of ``pid`` (grpc's included) to ``core``."""
    subprocess.run(["taskset", "-a", "-p", "-c", core, str(pid)], check=True, capture_output=True)


async def bare_relay_rps(standin: str, seconds: int, workdir: Path) -> float:
    """Non-streaming requests/s at concurrency 64 through ``bench.bare_relay`` on cortex's core."""
    listen = f"127.0.0.1:{free_port()}"
    relay = start_bare_relay(listen, standin)
    try:
        url = f"http://{listen}/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            for _ in range(100):  # until it answers
                try:
                    async with session.post(url, json=body(16, False)) as reply:
                        if reply.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        pin(relay.pid, CORTEX_CORE)
        return wrk(url, body(16, False), 64, seconds, workdir)
    finally:
        relay.terminate()
        relay.wait(timeout=10)


def start_bare_relay(listen: str, standin: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.bare_relay", "--listen", listen, "--neuron", standin],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def start_standin(listen: str, tokens_per_message: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "taskset",
            "-c",
            LOAD_CORE,
            sys.executable,
            "-m",
            "bench.standin_neuron",
            "--listen",
            listen,
            "--tokens-per-message",
            str(tokens_per_message),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


async def run(seconds: int, samples: int, tokens_per_message: int) -> list[tuple[str, str]]:
    """The gateway figures against a stand-in sending ``tokens_per_message`` (0: coalesced)."""
    workdir = Path(tempfile.mkdtemp(prefix="helexa-bench-gateway-"))
    listen = f"127.0.0.1:{free_port()}"
    standin = start_standin(listen, tokens_per_message)
    cortex = CortexProcess(
        workdir / "cortex",
        cortex_config([Endpoint(listen)], poll_interval=1.0),  # type: ignore[list-item]
        models=[],
    )
    rows: list[tuple[str, str]] = []
    try:
        await asyncio.sleep(1.0)
        direct = await latency_direct(listen, samples)
        cortex.start()
        assert cortex.proc is not None
        pin(cortex.proc.pid, CORTEX_CORE)
        await cortex.wait_ready()
        via = await latency_cortex(cortex.url, samples)
        p50_d, p99_d = percentile(direct, 50), percentile(direct, 99)
        p50_c, p99_c = percentile(via, 50), percentile(via, 99)
        rows += [
            (
                "direct gRPC, 16 tokens, concurrency 1: p50 / p99",
                f"{p50_d * 1000:.2f} / {p99_d * 1000:.2f} ms",
            ),
            (
                "through cortex, 16 tokens, concurrency 1: p50 / p99",
                f"{p50_c * 1000:.2f} / {p99_c * 1000:.2f} ms",
            ),
            (
                "added by cortex: p50 / p99",
                f"{(p50_c - p50_d) * 1000:.2f} / {(p99_c - p99_d) * 1000:.2f} ms",
            ),
        ]
        url = f"{cortex.url}/v1/chat/completions"
        for connections in (1, 64):
            rps = wrk(url, body(16, False), connections, seconds, workdir)
            rows.append((f"non-streaming requests/s, concurrency {connections}", f"{rps:,.0f}"))
        rps = await bare_relay_rps(listen, seconds, workdir)
        rows.append(
            ("bare relay, a grpc.aio call per request: requests/s, concurrency 64", f"{rps:,.0f}")
        )
        for connections in (1, 64):
            rps = wrk(url, body(256, True), connections, seconds, workdir)
            rows.append(
                (
                    f"streamed tokens/s, 256-token streams, concurrency {connections}",
                    f"{rps * 256:,.0f}",
                )
            )
        # The same streams through the other surfaces' event sequences (the chat body is
        # also a valid /v1/messages body).
        for route, streamed in (
            ("responses", responses_body(256, True)),
            ("messages", body(256, True)),
        ):
            rps = wrk(f"{cortex.url}/v1/{route}", streamed, 64, seconds, workdir)
            rows.append(
                (
                    f"streamed tokens/s through /v1/{route}, 256-token streams, concurrency 64",
                    f"{rps * 256:,.0f}",
                )
            )
    finally:
        cortex.stop()
        standin.terminate()
        standin.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run")
    parser.add_argument("--samples", type=int, default=1000, help="latency samples")
    args = parser.parse_args()
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        raise SystemExit("needs two cores: one for cortex, one for the load")
    # A stream's tokens all at once, then one per loop turn (as neuron's decode steps).
    at_once = asyncio.run(run(args.seconds, args.samples, 1))
    per_turn = asyncio.run(run(args.seconds, args.samples, 0))
    print("| gateway figure | a stream's tokens at once | a token per loop turn, as neuron |")
    print("|---|---|---|")
    for (name, a), (_, b) in zip(at_once, per_turn, strict=True):
        print(f"| {name} | {a} | {b} |")


if __name__ == "__main__":
    main()
