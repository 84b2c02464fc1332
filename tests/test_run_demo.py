"""`make run`'s script end to end: neuron, then cortex, a working curl line, clean Ctrl-C.

The demo configs bind fixed ports; this test runs the same script on copies of them with free
ports, so it never collides with a `make run` on this machine.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import tomli_w

from tests.harness import ROOT, SHARED_CACHE, free_port


def test_run_demo_prints_a_working_curl_line_and_stops_cleanly_on_ctrl_c(
    demo_dir: Path, tmp_path: Path
) -> None:
    neuron = tomllib.loads((ROOT / "configs/neuron.demo.toml").read_text())
    neuron.update(
        listen=f"127.0.0.1:{free_port()}",
        metrics_listen=f"127.0.0.1:{free_port()}",
        cache_dir=str(SHARED_CACHE),
    )
    cortex = tomllib.loads((ROOT / "configs/cortex.demo.toml").read_text())
    cortex.update(
        listen=f"127.0.0.1:{free_port()}",
        metrics_listen=f"127.0.0.1:{free_port()}",
        models_file=str(ROOT / "configs/models.demo.toml"),
    )
    cortex["neurons"][0]["endpoint"] = neuron["listen"]
    (tmp_path / "neuron.toml").write_text(tomli_w.dumps(neuron))
    (tmp_path / "cortex.toml").write_text(tomli_w.dumps(cortex))
    log_path = tmp_path / "run_demo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "scripts/run_demo.py",
                "--neuron-config",
                str(tmp_path / "neuron.toml"),
                "--cortex-config",
                str(tmp_path / "cortex.toml"),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        curl = None
        while time.monotonic() < deadline and curl is None and proc.poll() is None:
            curl = re.search(r"^\s+(curl -s .*)$", log_path.read_text(), re.MULTILINE)
            time.sleep(0.2)
        assert curl is not None, log_path.read_text()
        assert "openai" in log_path.read_text()
        reply = subprocess.run(
            shlex.split(curl.group(1)), capture_output=True, text=True, timeout=120
        )
        assert reply.returncode == 0, reply.stderr
        body = json.loads(reply.stdout)
        assert "Paris" in body["choices"][0]["message"]["content"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log_path.read_text()
        text = log_path.read_text()
        assert "model unloaded" in text  # the neuron drained and unloaded
        assert "cortex stopped" in text
        assert "stopped (cleanly)" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
