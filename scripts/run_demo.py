"""`make run`: the demo neuron, then cortex in front of it; Ctrl-C stops both cleanly.

Starts ``neuron serve`` with the demo config and waits until its health is SERVING (the first
start materialises the GGUF, about 20 s), starts ``cortex serve`` and waits until ``/ready``,
then prints a ``curl`` line that works. On Ctrl-C (or SIGTERM) cortex drains and stops first,
then the neuron drains, unloads and stops; the exit status is 0 when both stopped cleanly.
A second Ctrl-C kills both at once.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cortex.config import CortexConfig  # noqa: E402
from cortex.config import load as load_cortex  # noqa: E402

STOP_WITHIN = 90.0  # seconds each daemon gets to drain and exit before it is killed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neuron-config", type=Path, default=ROOT / "configs/neuron.demo.toml")
    parser.add_argument("--cortex-config", type=Path, default=ROOT / "configs/cortex.demo.toml")
    args = parser.parse_args()
    cortex_config, catalogue = load_cortex(args.cortex_config)
    with open(args.neuron_config, "rb") as f:
        neuron_listen = tomllib.load(f).get("listen", "0.0.0.0:13131")

    signals: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals.append(signum)
        if len(signals) > 1:
            for proc in started:
                if proc.poll() is None:
                    proc.kill()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started: list[subprocess.Popen[bytes]] = []
    # Own sessions: Ctrl-C reaches this script only, which then stops cortex before the neuron.
    neuron = _spawn("neuron", args.neuron_config)
    started.append(neuron)
    try:
        if not _wait_serving(neuron, neuron_listen, signals):
            return _stop_all(started, failed=not signals)
        cortex = _spawn("cortex", args.cortex_config)
        started.append(cortex)
        host, _, port = cortex_config.listen.rpartition(":")
        base = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        if not _wait_ready(cortex, base, signals):
            return _stop_all(started, failed=not signals)
        _announce(base, catalogue.models[0].id if catalogue.models else "MODEL", cortex_config)
        while not signals:
            if any(p.poll() is not None for p in started):
                print("run_demo: a daemon exited on its own; stopping the other", flush=True)
                return _stop_all(started, failed=True)
            time.sleep(0.2)
        return _stop_all(started, failed=False)
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()


def _spawn(program: str, config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", f"{program}.cli", "serve", "--config", str(config)],
        cwd=ROOT,
        start_new_session=True,
    )


def _wait_serving(proc: subprocess.Popen[bytes], endpoint: str, signals: list[int]) -> bool:
    print(f"run_demo: waiting for the neuron at {endpoint} ...", flush=True)
    deadline = time.monotonic() + 600
    with grpc.insecure_channel(endpoint) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and not signals and proc.poll() is None:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    print("run_demo: the neuron did not come up", file=sys.stderr, flush=True)
    return False


def _wait_ready(proc: subprocess.Popen[bytes], base: str, signals: list[int]) -> bool:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not signals and proc.poll() is None:
        try:
            with urllib.request.urlopen(base + "/ready", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    print("run_demo: cortex did not become ready", file=sys.stderr, flush=True)
    return False


def _announce(base: str, model: str, config: CortexConfig) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    body = json.dumps({"model": model, "messages": question, "max_tokens": 64, "temperature": 0})
    print(
        f"""
run_demo: cortex is ready at {base} (metrics at http://{config.metrics_listen}/metrics)

  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'

or with the openai SDK (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="unused")
  reply = client.chat.completions.create(model="{model}", max_tokens=64, temperature=0,
      messages=[{{"role": "user", "content": "What is the capital of France?"}}])
  print(reply.choices[0].message.content)

Ctrl-C stops cortex, then the neuron (it drains and unloads).
""",
        flush=True,
    )


def _stop_all(started: list[subprocess.Popen[bytes]], failed: bool) -> int:
    """Stop in reverse order of start (cortex first): SIGTERM, wait, SIGKILL past the bound."""
    clean = True
    for proc in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STOP_WITHIN)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        clean = clean and code == 0
    print(f"run_demo: stopped ({'cleanly' if clean else 'with errors'})", flush=True)
    return 0 if clean and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
