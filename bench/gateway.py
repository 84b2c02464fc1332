"""Gateway cost: cortex in front of a stand-in neuron that streams instantly, against calling
the stand-in directly over gRPC. cortex is pinned to one core (taskset), the load and the
stand-in to the other, so the figures are what one cortex process does on one core.

    .venv/bin/python -m bench.gateway [--seconds 10] [--rounds 3]

Whole answers (the stand-in gives every token of one at once to a caller that asks for it
whole, whatever its mode), once:

- added latency: non-streaming chat requests of 16 tokens, one at a time, p50/p99, through
  cortex against the same request straight to the stand-in over what cortex uses (one
  long-lived ``GenerateMany`` call, ``cortex.multiplex``);
- requests/s: non-streaming requests at concurrency 1 and 64 (wrk), and at 64 through
  ``bench.bare_relay`` alone on cortex's core: a bare aiohttp handler making a grpc.aio call
  per request, what cortex did before ``GenerateMany``.

Streams, with two stand-ins: the first produces a stream's tokens back to back (over
``GenerateMany`` its session merges them into one event); the second produces one token per
event-loop turn for every running stream, as neuron's decode steps do, and sends each time it
can: then a message carries about one token of every stream, the gateway's worst case (unless
cortex falls behind: then what queued meanwhile goes out merged, which the tokens per write
show). 256-token streams at concurrency 1 and 64 through chat completions, and at 64 through
``/v1/responses`` (its event sequence, each response kept) and Anthropic's ``/v1/messages``
(its event sequence). Each streamed figure runs ``--rounds`` times, the surfaces interleaved;
the table gives the median and the range.

What is counted comes from the answers themselves (wrk's Lua ``response`` hook): the tokens of
the delta events (``"tok "`` each), the delta events, and answers that were not a 200 ending in
their surface's last event with every token: those, and wrk's socket errors and timeouts, are
failures, shown and failing the run. Writes are cortex's own count of its writes to streaming
clients over the run (``helexa_gateway_stream_writes_total``; each is one socket send).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc

from bench.loadgen import head_commit, percentile
from cortex.multiplex import Multiplexer
from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import CortexProcess, cortex_config, free_port, metric_value

CORTEX_CORE, LOAD_CORE = "0", "1"
MODEL = "standin"
STREAM_TOKENS = 256
WHOLE_TOKENS = 16


@dataclass
class Endpoint:
    endpoint: str


@dataclass(frozen=True)
class Surface:
    """One API surface as wrk drives it: its route, a body, the JSON key before each delta
    event's text, and what its stream ends with."""

    route: str
    key: str
    ending: str

    def body(self, max_tokens: int, stream: bool) -> dict[str, object]:
        if self.route == "responses":
            return {"model": MODEL, "input": "Hello", "max_output_tokens": max_tokens,
                    "stream": stream}  # fmt: skip
        return {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": max_tokens,
            "stream": stream,
        }


# The stand-in's streams end at max_tokens: a Responses stream so ends as incomplete.
CHAT = Surface("chat/completions", '"content":"', "data: [DONE]")
SURFACES = (
    CHAT,
    Surface("responses", '"delta":"', "event: response.incomplete"),
    Surface("messages", '"text":"', "event: message_stop"),
)

# wrk counts what each answer holds; one thread, so ``done`` reads that thread's counts.
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %(body)s
local pattern = %(pattern)s
local ending = %(ending)s
local expected = %(expected)d
local streamed = %(streamed)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) answers = 0; tokens = 0; events = 0; bad = 0 end
function response(status, headers, body)
  answers = answers + 1
  if status ~= 200 then
    bad = bad + 1
    if bad <= 3 then io.stderr:write("HELEXA-FAILED " .. status .. " " .. string.sub(body, 1, 300) .. "\\n") end
    return
  end
  local n, e = 0, 0
  for text in string.gmatch(body, pattern) do
    e = e + 1
    n = n + select(2, string.gsub(text, "tok ", ""))
  end
  tokens = tokens + n; events = events + e
  if n ~= expected or (streamed and not string.find(body, ending, 1, true)) then
    bad = bad + 1
    if bad <= 3 then io.stderr:write("HELEXA-FAILED " .. n .. " " .. string.sub(body, -300) .. "\\n") end
  end
end
function done(summary, latency, requests)
  local a, t, e, b = 0, 0, 0, 0
  for _, thread in ipairs(threads) do
    a = a + thread:get("answers"); t = t + thread:get("tokens")
    e = e + thread:get("events"); b = b + thread:get("bad")
  end
  local s = summary.errors
  io.write(string.format("HELEXA answers=%%d tokens=%%d events=%%d bad=%%d socket=%%d\\n",
    a, t, e, b, s.connect + s.read + s.write + s.timeout))
end
"""


@dataclass
class Load:
    """What one wrk run got: answers, delta tokens and events, failures, seconds."""

    answers: int
    tokens: int
    events: int
    failures: int
    seconds: float
    writes: int = 0  # cortex's writes to streaming clients over the run


def lua_pattern(key: str) -> str:
    """A Lua pattern capturing the text of each delta event after ``key``."""
    return re.sub(r"([^\w\s])", r"%\1", key).replace("%:", "%:%s*") + '(tok [^"]*)"'


def wrk(
    url: str, surface: Surface, tokens: int, stream: bool, connections: int, seconds: int,
    workdir: Path,
) -> Load:  # fmt: skip
    """What wrk gets from ``url`` with ``surface``'s body."""
    script = workdir / "post.lua"
    script.write_text(
        LUA
        % {
            "body": json.dumps(json.dumps(surface.body(tokens, stream))),
            "pattern": json.dumps(lua_pattern(surface.key if stream else '"content":"')),
            "ending": json.dumps(surface.ending),
            "expected": tokens,
            "streamed": "true" if stream else "false",
        }
    )
    started = time.monotonic()
    ran = subprocess.run(
        ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
         "--timeout", "10s", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    if "HELEXA-FAILED" in ran.stderr:  # the first failed answers, to see why
        print(ran.stderr, file=sys.stderr)
    out = ran.stdout
    elapsed = time.monotonic() - started
    match = re.search(r"HELEXA answers=(\d+) tokens=(\d+) events=(\d+) bad=(\d+) socket=(\d+)", out)
    assert match, out
    answers, tokens_seen, events, bad, socket_errors = map(int, match.groups())
    return Load(answers, tokens_seen, events, bad + socket_errors, elapsed)


async def latency_direct(endpoint: str, n: int) -> list[float]:
    """Whole 16-token answers straight from the stand-in, over one long-lived GenerateMany
    call as cortex sends them."""
    samples = []
    async with grpc.aio.insecure_channel(endpoint) as channel:
        many = Multiplexer(pb_grpc.NeuronStub(channel))
        loop = asyncio.get_running_loop()
        try:
            for i in range(n + 50):
                request = pb.GenerateRequest(  # as cortex asks for a non-streaming answer
                    model=MODEL,
                    chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hello")]),
                    max_tokens=WHOLE_TOKENS,
                    message_interval=60.0,
                )
                started = time.perf_counter()
                generation = many.start(request, 10.0)
                await generation.started()
                while not any(m.finish_reason for m in generation.take()):
                    assert await generation.wait(loop.time() + 10), "the stand-in stalled"
                if i >= 50:  # warm-up
                    samples.append(time.perf_counter() - started)
        finally:
            await many.close()
    return samples


async def latency_cortex(url: str, n: int) -> list[float]:
    samples = []
    async with aiohttp.ClientSession() as session:
        for i in range(n + 50):
            started = time.perf_counter()
            async with session.post(
                f"{url}/v1/chat/completions", json=CHAT.body(WHOLE_TOKENS, False)
            ) as reply:
                await reply.read()
                assert reply.status == 200, reply.status
            if i >= 50:
                samples.append(time.perf_counter() - started)
    return samples


def pin(pid: int, core: str) -> None:
    """Pin every thread of ``pid`` (grpc's included) to ``core``."""
    subprocess.run(["taskset", "-a", "-p", "-c", core, str(pid)], check=True, capture_output=True)


async def bare_relay(standin: str, seconds: int, workdir: Path) -> Load:
    """Non-streaming requests at concurrency 64 through ``bench.bare_relay``, alone on
    cortex's core (cortex idles there meanwhile)."""
    listen = f"127.0.0.1:{free_port()}"
    relay = start_bare_relay(listen, standin)
    try:
        url = f"http://{listen}/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            for _ in range(100):  # until it answers
                try:
                    async with session.post(url, json=CHAT.body(WHOLE_TOKENS, False)) as reply:
                        if reply.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        pin(relay.pid, CORTEX_CORE)
        return wrk(url, CHAT, WHOLE_TOKENS, False, 64, seconds, workdir)
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
        ["taskset", "-c", LOAD_CORE, sys.executable, "-m", "bench.standin_neuron",
         "--listen", listen, "--tokens-per-message", str(tokens_per_message)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip


class Bench:
    """cortex (pinned to its core) in front of one stand-in, and what was measured."""

    def __init__(self, tokens_per_message: int, workdir: Path) -> None:
        self.workdir = workdir
        self.listen = f"127.0.0.1:{free_port()}"
        self.standin = start_standin(self.listen, tokens_per_message)
        self.cortex = CortexProcess(
            workdir / f"cortex-{tokens_per_message}",
            cortex_config([Endpoint(self.listen)], poll_interval=1.0),  # type: ignore[list-item]
            models=[],
        )
        self.failures = 0

    async def __aenter__(self) -> Bench:
        await asyncio.sleep(1.0)
        self.cortex.start()
        assert self.cortex.proc is not None
        pin(self.cortex.proc.pid, CORTEX_CORE)
        await self.cortex.wait_ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cortex.stop()
        self.standin.terminate()
        self.standin.wait(timeout=10)

    def load(self, surface: Surface, stream: bool, connections: int, seconds: int) -> Load:
        tokens = STREAM_TOKENS if stream else WHOLE_TOKENS
        before = self.writes()
        load = wrk(
            f"{self.cortex.url}/v1/{surface.route}", surface, tokens, stream, connections,
            seconds, self.workdir,
        )  # fmt: skip
        time.sleep(0.5)  # the streams wrk cut at its end have ended in cortex
        load.writes = self.writes() - before
        self.failures += load.failures
        return load

    def writes(self) -> int:
        return int(
            metric_value(self.cortex.metrics(), "helexa_gateway_stream_writes_total", model=MODEL)
        )


def streamed(loads: list[Load]) -> str:
    """Median streamed tokens/s of ``loads`` with the range, tokens per event and per write,
    and failures."""
    rates = [load.tokens / load.seconds for load in loads]
    tokens = sum(load.tokens for load in loads)
    events = sum(load.events for load in loads) or 1
    writes = sum(load.writes for load in loads) or 1
    failures = sum(load.failures for load in loads)
    return (
        f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}); "
        f"{tokens / events:.2f} tok/event, {tokens / writes:.2f} tok/write"
        + (f"; {failures} FAILED" if failures else "")
    )


async def whole_figures(seconds: int, samples: int, workdir: Path) -> list[tuple[str, str]]:
    """The figures of whole answers, against the per-turn stand-in (either gives a whole
    answer's tokens at once)."""
    async with Bench(0, workdir) as bench:
        direct = await latency_direct(bench.listen, samples)
        via = await latency_cortex(bench.cortex.url, samples)
        p50_d, p99_d = percentile(direct, 50), percentile(direct, 99)
        p50_c, p99_c = percentile(via, 50), percentile(via, 99)
        rows = [
            ("direct GenerateMany, 16 tokens, concurrency 1: p50 / p99",
             f"{p50_d * 1000:.2f} / {p99_d * 1000:.2f} ms"),
            ("through cortex, 16 tokens, concurrency 1: p50 / p99",
             f"{p50_c * 1000:.2f} / {p99_c * 1000:.2f} ms"),
            ("added by cortex: p50 / p99",
             f"{(p50_c - p50_d) * 1000:.2f} / {(p99_c - p99_d) * 1000:.2f} ms"),
        ]  # fmt: skip
        for connections in (1, 64):
            load = bench.load(CHAT, False, connections, seconds)
            rows.append((f"non-streaming requests/s, concurrency {connections}", _rps(load)))
        relay = await bare_relay(bench.listen, seconds, workdir)
        bench.failures += relay.failures
        rows.append(
            ("bare relay alone on cortex's core, a grpc.aio call per request: requests/s, "
             "concurrency 64", _rps(relay))
        )  # fmt: skip
    if bench.failures:
        rows.append(("FAILED answers (not 200, short, or socket errors)", str(bench.failures)))
    return rows


def _rps(load: Load) -> str:
    rate = f"{load.answers / load.seconds:,.0f}"
    return rate + (f" ({load.failures} FAILED)" if load.failures else "")


async def stream_figures(
    tokens_per_message: int, seconds: int, rounds: int, workdir: Path
) -> tuple[list[tuple[str, str]], int]:
    """The streamed figures against one stand-in, each ``rounds`` times, interleaved."""
    runs: dict[tuple[Surface, int], list[Load]] = {}
    order = [(CHAT, 1), *((surface, 64) for surface in SURFACES)]
    async with Bench(tokens_per_message, workdir) as bench:
        for _ in range(rounds):
            for surface, connections in order:
                load = bench.load(surface, True, connections, seconds)
                runs.setdefault((surface, connections), []).append(load)
    rows = []
    chat = statistics.median(load.tokens / load.seconds for load in runs[CHAT, 64])
    for surface, connections in order:
        figure = streamed(runs[surface, connections])
        if surface is not CHAT:
            median = statistics.median(load.tokens / load.seconds for load in runs[surface, 64])
            figure += f"; {median / chat:.2f}x chat"
        rows.append((f"streamed tokens/s, /v1/{surface.route}, concurrency {connections}", figure))
    return rows, bench.failures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run")
    parser.add_argument("--samples", type=int, default=1000, help="latency samples")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each streamed figure")
    args = parser.parse_args()
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        raise SystemExit("needs two cores: one for cortex, one for the load")
    commit = head_commit()
    workdir = Path(tempfile.mkdtemp(prefix="helexa-bench-gateway-"))
    try:
        whole = asyncio.run(whole_figures(args.seconds, args.samples, workdir))
        at_once, failed_a = asyncio.run(stream_figures(1, args.seconds, args.rounds, workdir))
        per_turn, failed_b = asyncio.run(stream_figures(0, args.seconds, args.rounds, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"commit {commit}; streamed: median (range) of {args.rounds} interleaved runs\n")
    print("| whole answers | |")
    print("|---|---|")
    for name, figure in whole:
        print(f"| {name} | {figure} |")
    print("\n| streams | a stream's tokens at once | a token per loop turn, as neuron |")
    print("|---|---|---|")
    for (name, a), (_, b) in zip(at_once, per_turn, strict=True):
        print(f"| {name} | {a} | {b} |")
    if failed_a or failed_b or any(name.startswith("FAILED") for name, _ in whole):
        raise SystemExit("answers failed: the figures above are not to be trusted")


if __name__ == "__main__":
    main()
