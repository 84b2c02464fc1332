"""Soak: the fleet under steady mixed load while its hosts fail, for minutes on end.

A cortex host and neuron hosts (network namespaces, ``tests.netns.hosted_fleet``), the demo
model in float32 (a greedy answer does not depend on the batch around it), cortex asking for
API keys. Clients send back to back, in turn, streamed and whole chat completions and
completions, greedy, from a fixed set of prompts, each request with a deadline. Meanwhile one
fault at a time, at random (seeded), then repaired and the fleet seen whole again:

- ``kill``: a neuron SIGKILLed, restarted a moment later (its streams resume elsewhere);
- ``cut``: a neuron's link taken down for seconds, then brought back;
- ``delay``: 200 ms and 5% loss on a neuron's link (``tc netem``, where the kernel has it);
- ``hup``: cortex's keys file rotated (a new key in, the last one out) and SIGHUP sent; the
  new key must be let in and the old one refused.

The first neuron is never killed, so its process (and cortex's) lives the whole run: their RSS
is sampled every second and must be flat after warm-up (the median of the last window within
``max(32 MiB, 5%)`` of the first window's after warm-up). At the end every request must have
been answered whole and equal to the prompt's answer on a quiet fleet, or refused with a clear
status (an error envelope, or a stream's error event before its ``[DONE]``); none broken, none
wrong (a doubled or lost piece of text is wrong), none past its deadline; cortex must have
counted each request once; every fault kind must have happened. A resumed stream may part
from the quiet answer at a near tie (its text so far runs as a prompt on the other neuron,
rounding differently): such an answer is ``diverged``, shown and allowed (see
``Soak.diverged``).

    .venv/bin/python -m bench.soak [--minutes 30] [--clients 4] [--neurons 2] [--seed 1]

Run as root (it builds network namespaces). It prints the report, and exits 1 when a check
failed. ``make test`` runs three minutes of it (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.loadgen import head_commit, percentile
from tests.harness import (
    DEMO_ID,
    CortexProcess,
    NeuronProcess,
    demo_model,
    metric_sum,
    metric_value,
    neurons_up,
)
from tests.netns import Host, HostedFleet, hosted_fleet, namespaces_refusal, netem_refusal

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
QUESTIONS = [
    "What is the capital of France?",
    "Name a colour of the sky.",
    "What do bees make?",
    "Say hello in Spanish.",
    "Write one sentence about the sea.",
    "What is two plus two?",
]
OPENINGS = [
    "The capital of France is",
    "Once upon a time, a small dragon",
    "The best way to make bread is",
    "In the morning the market",
]
# Each request's kind, in turn: every client sends all four.
KINDS = [(CHAT, True), (CHAT, False), (COMPLETIONS, True), (COMPLETIONS, False)]
MAX_TOKENS = 16
# A request not answered within this is hung (a stall or a lost stream; never a slow one).
DEADLINE = 240.0
# cortex's keepalive as short as a neuron allows: a dead link found in seconds.
FLEET = {"keepalive_time": 5.0, "keepalive_timeout": 2.0}
# Statuses that refuse clearly: capacity (429, 503, 529), a neuron that failed (502), a stall (504).
REFUSALS = {429, 502, 503, 504, 529}
MIB = 1 << 20
# What came of a generation whose neuron failed mid-way (cortex's resumptions_total).
RESULTS = ("resumed", "failed", "not_resumable")


@dataclass
class Answer:
    """One request and how it ended."""

    route: str
    stream: bool
    prompt: int
    started: float
    ended: float = 0.0
    verdict: str = ""  # whole, diverged, refused, wrong, broken, hung
    detail: str = ""
    text: str = ""


@dataclass
class Fault:
    kind: str
    target: str
    started: float
    ended: float = 0.0
    detail: str = ""

    def line(self) -> str:
        return (
            f"{self.started:7.1f}-{self.ended:7.1f} s {self.kind:<5} {self.target:<6} {self.detail}"
        )


@dataclass
class Series:
    """One process's RSS over the run (seconds since the start, bytes)."""

    name: str
    pid: int
    required: bool  # lives the whole run: must be flat
    samples: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class Report:
    seconds: float
    answers: list[Answer]
    faults: list[Fault]
    rss: list[Series]
    counted: float  # requests cortex counted on the two routes
    resumptions: dict[str, float]  # cortex's resumptions_total by result, during the run
    warmup: float
    window: float
    commit: str  # what ran: the commit when the run started
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def text(self) -> str:
        verdicts = Counter(a.verdict for a in self.answers)
        lines = [
            f"soak: {self.seconds:.0f} s, {len(self.answers)} requests, commit {self.commit}",
            "verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())),
        ]
        for (route, stream), group in _grouped(self.answers).items():
            done = [a.ended - a.started for a in group if a.verdict == "whole"]
            lines.append(
                f"  {route} {'stream' if stream else 'whole'}: {len(group)} sent, "
                f"{len(done)} whole, p50 {_ms(done, 50)} p99 {_ms(done, 99)}"
            )
        refused = Counter(a.detail for a in self.answers if a.verdict == "refused")
        for why, n in refused.most_common():
            lines.append(f"  refused {n}: {why}")
        kinds = Counter(f.kind for f in self.faults)
        lines.append("faults: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
        lines += [f"  {f.line()}" for f in self.faults]
        lines.append(f"cortex counted {self.counted:.0f} requests of {len(self.answers)} sent")
        lines.append(
            "generations whose neuron failed mid-way: "
            + (", ".join(f"{k} {v:.0f}" for k, v in sorted(self.resumptions.items())) or "none")
        )
        lines.append(
            f"RSS (MiB; warm-up {self.warmup:.0f} s, windows of {self.window:.0f} s): "
            "process, after warm-up, at the end, growth, peak"
        )
        short = Counter(
            s.name for s in self.rss if _rss_growth(s, self.warmup, self.window) is None
        )
        for name, n in short.items():
            lines.append(f"  {name}: {n} process{'es' if n > 1 else ''}, each too short to judge")
        for s in self.rss:
            flat = _rss_growth(s, self.warmup, self.window)
            if flat is None:
                continue
            start, end = flat
            peak = max(r for _, r in s.samples)
            lines.append(
                f"  {s.name} pid {s.pid}{' (whole run)' if s.required else ''}: "
                f"{start / MIB:.1f} {end / MIB:.1f} {(end - start) / MIB:+.1f} {peak / MIB:.1f}"
            )
        for a in self.answers:
            if a.verdict in ("diverged", "wrong", "broken", "hung"):
                lines.append(
                    f"  {a.verdict}: {a.route} stream={a.stream} prompt={a.prompt} "
                    f"at {a.started:.1f}-{a.ended:.1f} s: {a.detail}"
                )
        lines.append("PASS" if self.ok else "FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)


def _grouped(answers: list[Answer]) -> dict[tuple[str, bool], list[Answer]]:
    groups: dict[tuple[str, bool], list[Answer]] = {}
    for a in answers:
        groups.setdefault((a.route, a.stream), []).append(a)
    return groups


def _ms(values: list[float], p: float) -> str:
    return f"{1000 * percentile(values, p):.0f} ms" if values else "-"


def _rss_growth(series: Series, warmup: float, window: float) -> tuple[int, int] | None:
    """The median RSS of the first window after warm-up and of the last window, or None when
    the process did not live long enough for two windows after its warm-up."""
    if not series.samples:
        return None
    born = series.samples[0][0]
    after = [(t, r) for t, r in series.samples if t - born >= warmup]
    if not after or after[-1][0] - after[0][0] < 2 * window:
        return None
    first = [r for t, r in after if t - after[0][0] < window]
    last = [r for t, r in after if after[-1][0] - t < window]
    return int(statistics.median(first)), int(statistics.median(last))


def _body(route: str, prompt: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": DEMO_ID, "max_tokens": MAX_TOKENS, "temperature": 0}
    if route == CHAT:
        body["messages"] = [{"role": "user", "content": QUESTIONS[prompt % len(QUESTIONS)]}]
    else:
        body["prompt"] = OPENINGS[prompt % len(OPENINGS)]
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _content(route: str, choice: dict[str, Any], stream: bool) -> str:
    if route == COMPLETIONS:
        return str(choice.get("text") or "")
    part = choice.get("delta" if stream else "message") or {}
    return str(part.get("content") or "")


def _refusal(status: int, raw: bytes) -> str | None:
    """``STATUS code`` when the answer is a clear refusal: an error envelope with a message."""
    try:
        error = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if status not in REFUSALS or not isinstance(error, dict) or not error.get("message"):
        return None
    return f"{status} {error.get('code') or error.get('type')}"


def _usage_ok(usage: dict[str, Any] | None, finish: str) -> str:
    """Why the usage does not fit the answer ("" when it does)."""
    if not usage:
        return "no usage"
    tokens = usage.get("completion_tokens", -1)
    if not 0 < tokens <= MAX_TOKENS or (finish == "length" and tokens != MAX_TOKENS):
        return f"completion_tokens {tokens} with finish {finish}"
    return ""


async def ask(session: aiohttp.ClientSession, url: str, key: str, answer: Answer) -> None:
    """Send ``answer``'s request and fill in how it ended (but ``wrong``: the caller compares)."""
    headers = {"Authorization": f"Bearer {key}"}
    body = _body(answer.route, answer.prompt, answer.stream)
    async with session.post(url + answer.route, json=body, headers=headers) as r:
        if r.status != 200:
            raw = await r.read()
            refusal = _refusal(r.status, raw)
            answer.verdict = "refused" if refusal else "broken"
            answer.detail = refusal or f"{r.status}: {raw[:200]!r}"
            return
        if not answer.stream:
            reply = await r.json()
            choice = reply["choices"][0]
            answer.text = _content(answer.route, choice, False)
            finish = choice.get("finish_reason") or ""
            why = _usage_ok(reply.get("usage"), finish) if finish in ("stop", "length") else ""
            answer.verdict = "broken" if why or finish not in ("stop", "length") else "whole"
            answer.detail = why or (f"finish {finish!r}" if answer.verdict == "broken" else "")
            return
        await _read_stream(r, answer)


async def _read_stream(r: aiohttp.ClientResponse, answer: Answer) -> None:
    """Whole: text, one finish reason, usage, ``[DONE]`` last. Refused: an error event, then
    ``[DONE]``, no finish. Anything else is broken."""
    parts: list[str] = []
    finishes: list[str] = []
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    done = False
    async for line in r.content:
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: ") :].strip()
        if done:
            answer.verdict, answer.detail = "broken", f"an event after [DONE]: {data[:100]!r}"
            return
        if data == b"[DONE]":
            done = True
            continue
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            continue
        if error is not None:
            answer.verdict, answer.detail = "broken", "an event after the error event"
            return
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            parts.append(_content(answer.route, choice, True))
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    answer.text = "".join(parts)
    if not done:
        answer.verdict, answer.detail = "broken", "no [DONE]"
    elif error is not None:
        clear = bool(error.get("message")) and not finishes
        answer.verdict = "refused" if clear else "broken"
        answer.detail = f"stream error {error.get('code') or error.get('type')}"
    elif len(finishes) != 1 or finishes[0] not in ("stop", "length"):
        answer.verdict, answer.detail = "broken", f"finish reasons {finishes}"
    else:
        why = _usage_ok(usage, finishes[0])
        answer.verdict, answer.detail = ("broken", why) if why else ("whole", "")


class Soak:
    """One run: the fleet, its clients, its faults and its samples."""

    def __init__(
        self,
        hosted: HostedFleet,
        keys_file: Path,
        key: str,
        seed: int,
        clients: int,
        progress: bool = False,
    ) -> None:
        self.progress = progress  # print each fault as it is repaired
        self.hosted = hosted
        self.cortex: CortexProcess = hosted.cortex
        self.neurons: list[NeuronProcess] = hosted.neurons
        self.names = [f"n{i}" for i in range(len(self.neurons))]
        self.keys_file = keys_file
        self.key = key
        self.rng = random.Random(seed)
        self.clients = clients
        self.t0 = time.monotonic()
        self.stopping = asyncio.Event()
        self.answers: list[Answer] = []
        self.faults: list[Fault] = []
        self.references: dict[tuple[str, int], str] = {}
        self.rotated: str | None = None  # the rotating key now in the keys file
        self.rotations = itertools.count(1)
        self.series: dict[int, Series] = {}
        self.netem = netem_refusal() is None
        self.commit = head_commit()

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ---- the answers on a quiet fleet ----

    async def learn_references(self, session: aiohttp.ClientSession) -> None:
        """Each prompt's answer on each route, whole and streamed, which must agree."""
        for route, count in ((CHAT, len(QUESTIONS)), (COMPLETIONS, len(OPENINGS))):
            for prompt in range(count):
                texts = []
                for stream in (False, True):
                    answer = Answer(route, stream, prompt, self.now())
                    await ask(session, self.cortex.url, self.key, answer)
                    if answer.verdict != "whole":
                        raise AssertionError(f"on a quiet fleet: {answer}")
                    texts.append(answer.text)
                if texts[0] != texts[1]:
                    raise AssertionError(
                        f"{route} {prompt}: whole {texts[0]!r}, stream {texts[1]!r}"
                    )
                self.references[route, prompt] = texts[0]

    # ---- load ----

    async def client(self, session: aiohttp.ClientSession, index: int) -> None:
        for n in itertools.count():
            if self.stopping.is_set():
                return
            route, stream = KINDS[(index + n) % len(KINDS)]
            count = len(QUESTIONS) if route == CHAT else len(OPENINGS)
            answer = Answer(route, stream, (index * 7 + n) % count, self.now())
            self.answers.append(answer)
            try:
                await asyncio.wait_for(ask(session, self.cortex.url, self.key, answer), DEADLINE)
            except TimeoutError:
                answer.verdict, answer.detail = "hung", f"no answer within {DEADLINE:.0f} s"
            except (aiohttp.ClientError, ValueError, KeyError) as e:
                answer.verdict, answer.detail = "broken", f"{type(e).__name__}: {e}"
            answer.ended = self.now()
            if answer.verdict == "whole" and answer.text != self.references[route, answer.prompt]:
                answer.verdict = "wrong"
                answer.detail = (
                    f"{answer.text!r}, expected {self.references[route, answer.prompt]!r}"
                )

    # ---- faults ----

    async def fault_loop(self, session: aiohttp.ClientSession) -> None:
        kinds = ["kill", "cut", "hup"] + (["delay"] if self.netem else [])
        while not self.stopping.is_set():
            order = self.rng.sample(kinds, len(kinds))  # each kind once per cycle
            for kind in order:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.rng.uniform(4.0, 10.0))
                if self.stopping.is_set():
                    return
                fault = Fault(kind, "cortex" if kind == "hup" else "", self.now())
                self.faults.append(fault)
                await getattr(self, f"_{kind}")(session, fault)
                fault.ended = self.now()
                if self.progress:
                    done = Counter(a.verdict for a in self.answers if a.verdict)
                    print(f"{fault.line()}; answers so far: {dict(done)}", flush=True)

    async def _kill(self, session: aiohttp.ClientSession, fault: Fault) -> None:
        # Never the first neuron: its process lives the whole run (its RSS is judged).
        i = self.rng.randrange(1, len(self.neurons))
        neuron, fault.target = self.neurons[i], self.names[i]
        assert neuron.proc is not None
        neuron.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(neuron.proc.wait, 30)
        await asyncio.sleep(self.rng.uniform(1.0, 3.0))
        neuron.start()
        self._watch(neuron, fault.target, required=False)
        await neuron.wait_serving(within=180)
        await self._whole_fleet(fault)

    async def _cut(self, session: aiohttp.ClientSession, fault: Fault) -> None:
        await self._link_fault(fault, Host.cut, Host.mend, 3.0, 12.0, "down")

    async def _delay(self, session: aiohttp.ClientSession, fault: Fault) -> None:
        def degrade(host: Host) -> None:
            host.degrade(delay_ms=200, loss_percent=5)

        await self._link_fault(fault, degrade, Host.restore, 5.0, 12.0, "200 ms, 5% loss")

    async def _link_fault(
        self,
        fault: Fault,
        break_it: Callable[[Host], None],
        repair: Callable[[Host], None],
        shortest: float,
        longest: float,
        what: str,
    ) -> None:
        """A random neuron's link broken for a random while, then repaired."""
        fault.target = self.rng.choice(self.names)
        host = self.hosted.hosts[fault.target]
        seconds = self.rng.uniform(shortest, longest)
        break_it(host)
        try:
            await asyncio.sleep(seconds)
        finally:
            repair(host)
        fault.detail = f"{what} {seconds:.1f} s"
        await self._whole_fleet(fault)

    async def _hup(self, session: aiohttp.ClientSession, fault: Fault) -> None:
        """Rotate: a new key in, the last rotated one out; SIGHUP; the new one is let in
        within seconds and the old one is refused (the client's key stays throughout)."""
        old, new = self.rotated, f"soak-rotated-{next(self.rotations)}-{self.rng.getrandbits(64):x}"
        _write_keys(self.keys_file, self.key, new)
        self.cortex.send(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while await self._models_status(session, new) != 200:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the new key was not let in within 30 s:\n{self.cortex.log()}"
                )
            await asyncio.sleep(0.2)
        self.rotated = new
        if old is not None:
            status = await self._models_status(session, old)
            if status != 401:
                raise AssertionError(f"a key taken out of the keys file answered {status}")
        fault.detail = "new key let in" + (", old key refused" if old else "")

    async def _models_status(self, session: aiohttp.ClientSession, key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        async with session.get(self.cortex.url + "/v1/models", headers=headers) as r:
            await r.read()
            return r.status

    async def _whole_fleet(self, fault: Fault, within: float = 120.0) -> None:
        """Wait until cortex routes to every neuron again."""
        deadline = time.monotonic() + within
        while (up := await neurons_up(self.cortex)) != self.names:
            if time.monotonic() > deadline:
                raise AssertionError(f"after {fault}: neurons up {up}, never {self.names}")
            await asyncio.sleep(0.2)

    # ---- memory ----

    def _watch(self, daemon: CortexProcess | NeuronProcess, name: str, required: bool) -> None:
        assert daemon.proc is not None
        self.series[daemon.proc.pid] = Series(name, daemon.proc.pid, required)

    async def sample_rss(self) -> None:
        while not self.stopping.is_set():
            for pid, series in self.series.items():
                rss = _rss(pid)
                if rss is not None:
                    series.samples.append((self.now(), rss))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 1.0)

    # ---- the run ----

    async def run(self, seconds: float) -> Report:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await self.learn_references(session)
            self.t0 = time.monotonic()
            self._watch(self.cortex, "cortex", required=True)
            for i, neuron in enumerate(self.neurons):
                self._watch(neuron, self.names[i], required=i == 0)
            before = _cortex_counts(self.cortex)
            tasks = [asyncio.create_task(self.client(session, i)) for i in range(self.clients)]
            faults = asyncio.create_task(self.fault_loop(session))
            sampler = asyncio.create_task(self.sample_rss())
            try:
                await asyncio.wait([faults], timeout=seconds)
                self.stopping.set()
                await faults  # its fault repaired (or its failure raised)
                await asyncio.gather(*tasks)
            finally:
                self.stopping.set()
                for task in [*tasks, faults, sampler]:
                    task.cancel()
                await asyncio.gather(*tasks, faults, sampler, return_exceptions=True)
            elapsed = self.now()
        grown = {k: v - before[k] for k, v in _cortex_counts(self.cortex).items()}
        counted = grown.pop("requests")
        resumed = {result: n for result, n in grown.items() if n}
        return self.judge(elapsed, counted, resumed, seconds)

    def diverged(self, resumed: float) -> None:
        """Tell the wrong answers from those a resumption parted from the quiet answer.

        A stream resumed on another neuron goes on from its text so far, run there as a
        prompt: float32 arithmetic that rounds differently from the decode steps it replaces,
        so at a near tie its greedy answer may part from the quiet one. Such an answer is
        ``diverged``, not wrong, when it ran across a kill or a cut, it parts with new text
        (no piece of the quiet answer from another place: a doubled or lost piece is
        wrong), and there are no more of them than cortex resumed streams."""
        faults = [f for f in self.faults if f.kind in ("kill", "cut")]
        candidates = [
            a
            for a in self.answers
            if a.verdict == "wrong"
            and not _misplaced(a.text, self.references[a.route, a.prompt])
            and any(f.started <= a.ended and a.started <= f.ended for f in faults)
        ]
        if len(candidates) <= resumed:
            for a in candidates:
                a.verdict = "diverged"

    def judge(
        self, elapsed: float, counted: float, resumed: dict[str, float], seconds: float
    ) -> Report:
        warmup, window = min(300.0, seconds / 3), min(120.0, seconds / 6)
        report = Report(
            elapsed,
            self.answers,
            self.faults,
            list(self.series.values()),
            counted,
            resumed,
            warmup,
            window,
            self.commit,
        )
        self.diverged(resumed.get("resumed", 0.0))
        bad = Counter(a.verdict for a in self.answers if a.verdict in ("wrong", "broken", "hung"))
        report.failures += [f"{n} {verdict}" for verdict, n in bad.items()]
        if not any(a.verdict == "whole" for a in self.answers):
            report.failures.append("no request answered whole")
        if counted != len(self.answers):
            report.failures.append(f"cortex counted {counted:.0f} requests of {len(self.answers)}")
        kinds = {"kill", "cut", "hup"} | ({"delay"} if self.netem else set())
        missing = kinds - {f.kind for f in self.faults}
        if missing:
            report.failures.append(f"no {', '.join(sorted(missing))} fault in the run")
        for s in report.rss:
            growth = _rss_growth(s, warmup, window)
            if not s.required:
                continue
            if growth is None:
                report.failures.append(f"{s.name}'s RSS too short to judge")
            elif growth[1] - growth[0] > max(32 * MIB, 0.05 * growth[0]):
                report.failures.append(
                    f"{s.name}'s RSS grew {(growth[1] - growth[0]) / MIB:.1f} MiB after warm-up"
                )
        return report


# Characters of an answer past where it parts from the quiet one that are looked for
# elsewhere in the quiet one (a doubled or lost piece goes on with text from another place).
PIECE = 12


def _misplaced(text: str, quiet: str) -> bool:
    """Whether ``text``, where it parts from ``quiet``, ends or goes on with a piece of
    ``quiet`` from another place: a piece doubled or lost, not new text."""
    k = 0
    while k < min(len(text), len(quiet)) and text[k] == quiet[k]:
        k += 1
    piece = text[k : k + PIECE]
    if not piece:
        return True  # it stops short of the quiet answer: its end is lost
    at = quiet.find(piece)
    while at != -1:
        if at != k:
            return True
        at = quiet.find(piece, at + 1)
    return False


def _write_keys(path: Path, *keys: str) -> Path:
    """cortex's keys file, one key a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key}\n" for key in keys))
    return path


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cortex_counts(cortex: CortexProcess) -> dict[str, float]:
    """What cortex has counted: ``requests`` on the chat and completions routes (whatever
    their status), and generations whose neuron failed mid-way by result (resumptions_total)."""
    text = cortex.metrics()
    counts = {r: metric_value(text, "helexa_gateway_resumptions_total", result=r) for r in RESULTS}
    counts["requests"] = sum(
        metric_sum(text, "helexa_gateway_requests_total", route=route)
        for route in (CHAT, COMPLETIONS)
    )
    return counts


@contextlib.asynccontextmanager
async def soak_fleet(root: Path, neurons: int, key: str) -> AsyncIterator[tuple[HostedFleet, Path]]:
    """The fleet a soak runs on, with cortex's keys file (``key`` in it)."""
    keys_file = _write_keys(root / "api-keys", key)
    async with hosted_fleet(
        root,
        neurons=neurons,
        model=demo_model(dtype="float32"),
        fleet=FLEET,
        auth={"keys_file": str(keys_file)},
    ) as hosted:
        yield hosted, keys_file


async def soak(
    root: Path,
    seconds: float,
    clients: int = 4,
    neurons: int = 2,
    seed: int = 1,
    progress: bool = False,
) -> Report:
    """Run the soak for ``seconds`` under ``root``; the report says whether it held."""
    key = f"soak-client-key-{seed}"
    async with soak_fleet(root, neurons, key) as (hosted, keys_file):
        return await Soak(hosted, keys_file, key, seed, clients, progress).run(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--neurons", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.neurons < 2:
        parser.error("--neurons: at least 2 (one is never killed, the others are)")
    refusal = namespaces_refusal()
    if refusal is not None:
        print(f"soak: {refusal}", file=sys.stderr)
        return 2
    command = " ".join(["python -m bench.soak", *(argv if argv is not None else sys.argv[1:])])
    print(f"$ {command}", flush=True)
    with tempfile.TemporaryDirectory(prefix="helexa-soak-") as root:
        report = asyncio.run(
            soak(Path(root), args.minutes * 60, args.clients, args.neurons, args.seed, True)
        )
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
