"""Real processes for end-to-end tests: neurons and cortex on free ports (or on hosts of their own,
with tests/netns.py).

Every process logs to a file in the test's tmp dir; readiness is polled with a deadline, never
slept for; ``stop()`` always leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import grpc
import tomli_w
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cortex.neuronlink import Link, open_channel
from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
DEMO_GGUF = ROOT / "models/demo/SmolLM2-135M-Instruct.Q4_1.gguf"
# Shared by every test process so the GGUF is materialised once per machine, not per test.
SHARED_CACHE = ROOT / ".cache/test-neuron"
DEMO_ID = "smollm2"


async def until(condition: Callable[[], object], within: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.001)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(
    program: str, command: str, config: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    """``neuron`` or ``cortex`` COMMAND --config CONFIG [OPTIONS] from the source tree, run to
    its end."""
    return subprocess.run(
        [sys.executable, "-m", f"{program}.cli", command, "--config", str(config), *options],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def demo_model(model_id: str = DEMO_ID, **extra: Any) -> dict[str, Any]:
    """A ``[[default_models]]`` entry (or LoadModel spec fields) for the demo GGUF."""
    return {"id": model_id, "path": str(DEMO_GGUF), **extra}


def demo_spec(model_id: str = DEMO_ID, **extra: Any) -> pb.ModelSpec:
    return pb.ModelSpec(id=model_id, local=pb.LocalSource(path=str(DEMO_GGUF)), **extra)


def chat(model: str, content: str, **params: Any) -> pb.GenerateRequest:
    message = pb.ChatMessage(role="user", content=content)
    return pb.GenerateRequest(model=model, chat=pb.ChatMessages(messages=[message]), **params)


def endless(model: str = DEMO_ID, max_tokens: int = 4000) -> pb.GenerateRequest:
    """A stream that holds its batch slot until cancelled: greedy counting (no template) goes
    on past hundreds of tokens, where a sampled story can end early and free its slot."""
    return pb.GenerateRequest(
        model=model, prompt="1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=max_tokens, temperature=0
    )


def stub_gateway(max_tokens: int = 4096, stall: float = 30.0) -> Any:
    """What a surface's parser reads of the gateway (limits, the stall timeout, the router's
    names), without processes: every model name resolves to itself."""
    from types import SimpleNamespace

    return SimpleNamespace(
        config=SimpleNamespace(
            limits=SimpleNamespace(max_tokens=max_tokens), timeouts=SimpleNamespace(stall=stall)
        ),
        router=SimpleNamespace(resolve=lambda name: name),
    )


# Every daemon a test started, so a failing test can show what they were doing (conftest).
STARTED: list[Daemon] = []


class Daemon:
    """What every daemon under test offers: its log, signals, exit, stop and metrics."""

    name: ClassVar[str]  # "neuron" or "cortex": names its log and config files
    proc: subprocess.Popen[bytes] | None
    workdir: Path
    config: dict[str, Any]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config['metrics_listen']}/metrics"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.toml"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stacks_and_log(self, lines: int = 120) -> str:
        """Ask a running daemon for every thread's stack (SIGUSR1); the end of its log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_exit(self, within: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=within)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after a bound); safe to call twice."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            return str(reply.read().decode())

    async def wait_log(self, text: str, within: float = 30.0) -> None:
        """Poll the log until it holds ``text``; fail with the log if the process dies first."""
        deadline = time.monotonic() + within
        while text not in self.log():
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never logged {text!r}:\n{self.log()}")
            await asyncio.sleep(0.05)


@dataclass
class NeuronProcess(Daemon):
    """A ``neuron serve`` subprocess with its config, ports and log."""

    name: ClassVar[str] = "neuron"
    workdir: Path
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    # The command before ``serve --config PATH``: the source tree's neuron unless a test runs
    # another copy (the packaged /usr/bin/neuron), then from ``cwd``.
    program: list[str] = field(default_factory=lambda: [sys.executable, "-m", "neuron.cli"])
    cwd: Path = ROOT
    # What runs the command on its host (``ip netns exec NAME``, tests/netns.py); none: here.
    launcher: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    # How tests dial it: its token and TLS, as cortex would (health needs no token).
    link: Link = field(default_factory=Link)

    @property
    def endpoint(self) -> str:
        return str(self.config["listen"])

    def channel(self, link: Link | None = None) -> grpc.aio.Channel:
        """A channel to it with ``link`` (by default its own)."""
        return open_channel(self.endpoint, self.link if link is None else link, [])

    def start(self) -> NeuronProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(tomli_w.dumps(self.config))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, *self.program, "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
            )
        STARTED.append(self)
        return self

    async def wait_serving(self, within: float = 120.0) -> None:
        """Poll grpc.health until SERVING; fail with the log if the process dies first."""
        deadline = time.monotonic() + within
        async with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"neuron exited {self.proc.returncode}:\n{self.log()}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"neuron not SERVING within {within}s:\n{self.log()}")


# The environment the unpacked packages' launchers (/usr/bin/neuron, /usr/bin/cortex) run with:
# the test virtualenv's Python in place of the package's own virtualenv, and no source tree on
# the path, so what runs is the packaged code.
PACKAGED_ENV = {"HELEXA_PYTHON": sys.executable, "PYTHONPATH": ""}


def packaged_neuron(
    unpacked: Path, workdir: Path, env: dict[str, str] | None = None
) -> NeuronProcess:
    """The unpacked package's /usr/bin/neuron with its example config, as an operator would
    edit it: free loopback ports, a cache under ``workdir`` (its gguf/ shared with the other
    tests, so the demo model is materialised once) and the demo model, from a directory
    ``loading.local_dirs`` allows, as its default model."""
    config = tomllib.loads((unpacked / "etc/neuron/neuron.toml").read_text())
    cache = workdir / "cache"
    cache.mkdir(parents=True)
    (cache / "gguf").symlink_to(SHARED_CACHE / "gguf")
    config |= {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
        "cache_dir": str(cache),
        "loading": {**config["loading"], "local_dirs": [str(DEMO_GGUF.parent)]},
        "default_models": [demo_model()],
    }
    return NeuronProcess(
        workdir / "neuron",
        config,
        env={**PACKAGED_ENV, **(env or {})},
        program=[str(unpacked / "usr/bin/neuron")],
        cwd=workdir,
    )


class NotifySocket:
    """A Unix datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[str] = []

    def wait_for(self, state: str, proc: subprocess.Popen[bytes], within: float, log: str) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                self.received.extend(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                pass
            if state in self.received:
                return
            if proc.poll() is not None and state not in self.received:
                raise AssertionError(
                    f"{proc.args[0]} exited {proc.returncode} before {state}:\n{log}"
                )
        raise AssertionError(f"no {state} within {within}s (got {self.received}):\n{log}")

    def close(self) -> None:
        self.sock.close()


def neuron_config(
    default_models: list[dict[str, Any]] | None = None,
    drain_timeout: float = 30.0,
    max_batch_size: int = 16,
    max_waiting: int = 256,
    # The demo model in float32 (a CPU without native bf16) is 0.54 GB of weights and, at 16
    # requests of its 8,192-token context, 6.1 GB of KV cache reserved.
    cpu_memory_budget: str = "16GiB",
    cpu_threads: int = 1,
    cache_dir: Path = SHARED_CACHE,
    log_level: str = "info",
    **top: Any,
) -> dict[str, Any]:
    """A neuron config on free loopback ports, CPU only, sharing the test model cache."""
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
        "cache_dir": str(cache_dir),
        "log_level": log_level,
        # One torch thread: with more threads than free cores (test processes share two), each
        # of a step's ~200 parallel regions waits for a descheduled thread: 25-70x slower.
        "devices": {
            "use": ["cpu"],
            "cpu_memory_budget": cpu_memory_budget,
            "cpu_threads": cpu_threads,
        },
        "engine": {"max_batch_size": max_batch_size, "max_waiting": max_waiting},
        "shutdown": {"drain_timeout": drain_timeout},
        # Local sources: the demo model's directory (and cache_dir).
        "loading": {"local_dirs": [str(DEMO_GGUF.parent)]},
        "default_models": default_models or [],
        **top,
    }


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` that has ``labels`` (whatever its other labels)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


async def collect(stub: pb_grpc.NeuronStub, request: pb.GenerateRequest) -> tuple[str, Any, int]:
    """Run one Generate to its end: (text, last message, number of messages)."""
    text, last, count = "", None, 0
    async for reply in stub.Generate(request, timeout=300):
        text += reply.text
        last, count = reply, count + 1
    return text, last, count


async def read_rest(call: Any) -> tuple[str, Any]:
    """Read a Generate call (started with ``read()``) to its end: (text, last message)."""
    text, last = "", None
    while (reply := await call.read()) is not grpc.aio.EOF:
        text += reply.text
        last = reply
    return text, last


@dataclass
class CortexProcess(Daemon):
    """A ``cortex serve`` subprocess with its cortex.toml, models.toml, ports and log."""

    name: ClassVar[str] = "cortex"
    workdir: Path
    config: dict[str, Any]
    models: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # The command before ``serve --config PATH``: the source tree's cortex unless a test runs
    # another copy (the packaged /usr/bin/cortex), then from ``cwd``.
    program: list[str] = field(default_factory=lambda: [sys.executable, "-m", "cortex.cli"])
    cwd: Path = ROOT
    # What runs the command on its host (``ip netns exec NAME``, tests/netns.py); none: here.
    launcher: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config['listen']}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(tomli_w.dumps(self.config))
        (self.workdir / "models.toml").write_text(tomli_w.dumps({"models": self.models}))
        return self.config_path

    def start(self) -> CortexProcess:
        self.write_config()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, *self.program, "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
            )
        STARTED.append(self)
        return self

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    async def wait_ready(self, within: float = 60.0, path: str = "/ready") -> None:
        """Poll ``path`` until 200; fail with the log if the process dies first."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"cortex exited {self.proc.returncode}:\n{self.log()}")
            try:
                if await asyncio.to_thread(self._get, path) == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"cortex {path} not 200 within {within}s:\n{self.log()}")


@contextlib.asynccontextmanager
async def serving(cortex: CortexProcess) -> AsyncIterator[CortexProcess]:
    """``cortex`` started and ready; stopped on the way out, whatever happened."""
    cortex.start()
    try:
        await cortex.wait_ready()
        yield cortex
    finally:
        cortex.stop()


HARNESS_ADMIN_KEY = "harness-admin-key-7c2e9a4d1b"


def cortex_config(
    neurons: list[NeuronProcess],
    names: list[str] | None = None,
    poll_interval: float = 0.5,
    drain_timeout: float = 30.0,
    **sections: Any,
) -> dict[str, Any]:
    """A cortex config on free loopback ports over ``neurons`` (named n0, n1, ... by default)."""
    names = names or [f"n{i}" for i in range(len(neurons))]
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
        "models_file": "models.toml",
        "neurons": [
            {"name": n, "endpoint": p.endpoint} for n, p in zip(names, neurons, strict=True)
        ],
        "fleet": {"poll_interval": poll_interval, "down_after_failures": 1, "rpc_timeout": 2.0},
        "shutdown": {"drain_timeout": drain_timeout},
        # What `cortex status` and the other admin commands ask with (from this config).
        "admin": {"keys": [f"harness {HARNESS_ADMIN_KEY}"]},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def catalogue_model(model_id: str, memory: str = "350MB", **extra: Any) -> dict[str, Any]:
    """A models.toml entry for the demo GGUF under ``model_id`` (bf16: 380,647,296 bytes)."""
    return {"id": model_id, "path": str(DEMO_GGUF), "memory": memory, **extra}


@dataclass
class PrometheusProcess(Daemon):
    """Debian's ``prometheus`` scraping cortex and neurons every second (jobs ``helexa-cortex``
    and ``helexa-neuron``, as deploy/prometheus/prometheus.yml names them) with ``rule_files``
    evaluated every second, its data in ``workdir``; asked through its HTTP API."""

    name: ClassVar[str] = "prometheus"
    workdir: Path
    cortexes: list[CortexProcess]
    neurons: list[NeuronProcess]
    rule_files: list[Path] = field(default_factory=list)
    listen: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    config: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "prometheus.yml"

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    def start(self) -> PrometheusProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        jobs = {"helexa-cortex": self.cortexes, "helexa-neuron": self.neurons}
        self.config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [{"targets": [d.config["metrics_listen"] for d in daemons]}],
                }
                for job, daemons in jobs.items()
                if daemons
            ],
        }
        self.config_path.write_text(yaml.safe_dump(self.config))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address={self.listen}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        STARTED.append(self)
        return self

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/PATH?PARAMS``'s ``data``, after checking its status is success."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The series an instant query of ``expr`` returns now."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts now pending or firing."""
        return list(self.api("alerts")["alerts"])

    async def wait_scraping(self, within: float = 60.0) -> None:
        """Poll until every target answers its scrape (``up`` is 1 for each)."""
        targets = sum(
            len(sc["static_configs"][0]["targets"]) for sc in self.config["scrape_configs"]
        )

        def all_up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            try:
                return len(self.query("up == 1")) == targets
            except OSError:
                return False

        await until_polled(all_up, within, f"prometheus did not scrape every target:\n{self.log()}")


class Many:
    """One GenerateMany call: starts and cancels go up, events are kept per id as they come."""

    def __init__(self, stub: pb_grpc.NeuronStub) -> None:
        self.call: Any = stub.GenerateMany(timeout=300)
        self.events: dict[int, list[pb.GenerateEvent]] = defaultdict(list)
        self.messages: list[pb.GenerateManyResponse] = []

    async def start(self, requests: dict[int, pb.GenerateRequest]) -> None:
        starts = [pb.GenerateManyRequest.Start(id=i, request=r) for i, r in requests.items()]
        await self.call.write(pb.GenerateManyRequest(start=starts))

    async def cancel(self, *ids: int) -> None:
        await self.call.write(pb.GenerateManyRequest(cancel=ids))

    def over(self, id: int) -> bool:
        events = self.events.get(id, [])
        return bool(events) and _is_last(events[-1])

    def responded(self, id: int) -> bool:
        """Whether a message of ``id``'s generation has come (it is past its queue)."""
        return any(e.HasField("response") for e in self.events.get(id, []))

    def text(self, id: int) -> str:
        return "".join(e.response.text for e in self.events[id] if e.HasField("response"))

    async def read_until(self, done: Any) -> None:
        """Read messages until ``done()`` holds."""
        while not done():
            message = await self.call.read()
            assert message is not grpc.aio.EOF, "the call ended early"
            self.messages.append(message)
            for event in message.events:
                assert not self.over(event.id), f"an event for {event.id} after its last"
                self.events[event.id].append(event)


def _is_last(event: pb.GenerateEvent) -> bool:
    return event.HasField("error") or bool(event.response.finish_reason)


async def leave_stream_and_see_it_cancelled(
    cortex: CortexProcess, neuron: NeuronProcess, path: str, body: dict[str, Any], event: bytes
) -> None:
    """Stream ``body`` from ``path``, leave after three lines starting with ``event``, and
    wait until the neuron counts the generation cancelled (nothing left running) and cortex
    counts a 499 on the route."""

    def cancelled() -> float:
        text = neuron.metrics()
        return metric_value(text, "helexa_neuron_requests_total", finish_reason="cancelled")

    before = cancelled()
    async with aiohttp.ClientSession() as session:
        async with session.post(cortex.url + path, json=body) as r:
            assert r.status == 200
            seen = 0
            async for line in r.content:
                seen += line.startswith(event)
                if seen >= 3:
                    break
        # Leaving the block closes the connection mid-stream.
    await until_polled(
        lambda: cancelled() > before, 60, "the neuron never saw the generation cancelled"
    )
    running = metric_value(neuron.metrics(), "helexa_neuron_requests_running", model=DEMO_ID)
    assert running == 0
    await until_polled(
        lambda: metric_value(
            cortex.metrics(), "helexa_gateway_requests_total", route=path, status="499"
        ),
        10,
        "the disconnect was not counted as 499",
    )


async def until_polled(condition: Callable[[], object], within: float, what: str) -> None:
    """``until`` for a condition that asks a daemon over HTTP: every 50 ms."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


# ---- a fleet as a client sees it ----


async def neurons_up(cortex: CortexProcess) -> list[str]:
    """The neurons cortex routes to now (``/ready``), by name."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(cortex.url + "/ready") as r:
            return list((await r.json())["neurons_up"])


async def wait_up(cortex: CortexProcess, expected: list[str], within: float = 60.0) -> None:
    """Poll ``/ready`` until exactly ``expected`` are up; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await neurons_up(cortex) == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"neurons up never became {expected}: {await neurons_up(cortex)}")


def served(neuron: NeuronProcess, model: str = DEMO_ID) -> float:
    """Requests for ``model`` the neuron finished, whatever their finish reason."""
    return metric_sum(neuron.metrics(), "helexa_neuron_requests_total", model=model)


def _chunk(event: bytes) -> dict[str, Any]:
    return dict(json.loads(event[len(b"data: ") :]))


class Stream:
    """One streamed chat completion read event by event (``data:`` lines)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[bytes] = []

    async def next_event(self) -> bytes:
        while True:
            line = await self.response.content.readline()
            if not line:
                raise AssertionError(f"stream ended after {self.events}")
            if line.startswith(b"data: "):
                self.events.append(line.strip())
                return line.strip()

    async def rest(self) -> list[bytes]:
        while (await self.next_event()) != b"data: [DONE]":
            pass
        return self.events

    def errored(self) -> bool:
        return any(b'"error"' in e for e in self.events)

    def error(self) -> dict[str, Any]:
        """The error event's ``error`` object (the stream must have one)."""
        (error,) = [_chunk(e)["error"] for e in self.events if b'"error"' in e]
        return dict(error)

    def chunks(self) -> list[dict[str, Any]]:
        """Every chunk but errors and ``[DONE]``."""
        return [_chunk(e) for e in self.events if e != b"data: [DONE]" and b'"error"' not in e]

    def text(self) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in self.chunks() if c["choices"]
        )

    def finish_reasons(self) -> list[str]:
        return [
            c["choices"][0]["finish_reason"]
            for c in self.chunks()
            if c["choices"] and c["choices"][0].get("finish_reason")
        ]


def _text_of(event: bytes) -> str:
    if event == b"data: [DONE]":
        raise AssertionError("the stream ended before its first text")
    body = _chunk(event)
    assert "error" not in body, body
    return str(body["choices"][0]["delta"].get("content") or "")


async def open_stream(
    session: aiohttp.ClientSession, cortex: CortexProcess, body: dict[str, Any]
) -> Stream:
    """Start a streamed chat completion and read it up to its first chunk carrying text (the
    neuron is generating it)."""
    response = await session.post(cortex.url + "/v1/chat/completions", json=body)
    assert response.status == 200
    stream = Stream(response)
    while not _text_of(await stream.next_event()):
        pass
    return stream
