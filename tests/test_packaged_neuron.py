"""The neuron as its RPM installs it: the packaged launcher, code and example config.

The package's files are unpacked into a tmp root and /usr/bin/neuron runs from there with the
test virtualenv's Python (``HELEXA_PYTHON``; on a host the package's own virtualenv): what is
under test is the packaged files, not the dependencies. ``NOTIFY_SOCKET`` points at a datagram
socket the test owns, as systemd's does for a Type=notify unit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import (
    DEMO_ID,
    PACKAGED_ENV,
    NeuronProcess,
    NotifySocket,
    chat,
    collect,
    packaged_neuron,
)


def packaged_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **PACKAGED_ENV, **extra}


def test_packaged_launcher_runs_the_packaged_code(unpacked: Path, tmp_path: Path) -> None:
    # The launcher puts ../lib/helexa-neuron first on the path and runs with -P: those modules,
    # not the source tree's (installed editable in the test venv), are what run.
    lib = unpacked / "usr/lib/helexa-neuron"
    done = subprocess.run(
        [sys.executable, "-P", "-c", "import neuron, helexa; print(neuron.__file__, helexa.__file__)"],
        env={**os.environ, "PYTHONPATH": str(lib)},
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == [str(lib / "neuron/__init__.py"), str(lib / "helexa/__init__.py")]
    launcher = (unpacked / "usr/bin/neuron").read_text()
    assert 'PYTHONPATH="$lib' in launcher and '-P -m neuron.cli "$@"' in launcher


def test_packaged_example_config_passes_check_config_once_given_a_token(
    unpacked: Path, tmp_path: Path
) -> None:
    def check(config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(unpacked / "usr/bin/neuron"), "check-config", "--config", str(config)],
            env=packaged_env(), cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip

    # As installed it listens on 0.0.0.0 with no token: refused, naming what to set.
    done = check(unpacked / "etc/neuron/neuron.toml")
    assert done.returncode == 2 and "auth.allow_unauthenticated" in done.stderr, done.stderr
    (tmp_path / "token").write_text("a-token-for-the-test\n")
    text = (unpacked / "etc/neuron/neuron.toml").read_text()
    text = text.replace('token_file = ""', f'token_file = "{tmp_path / "token"}"', 1)
    (tmp_path / "neuron.toml").write_text(text)
    done = check(tmp_path / "neuron.toml")
    assert done.returncode == 0, done.stderr
    assert "ok (0 default models)" in done.stdout


def test_packaged_launcher_without_its_virtualenv_says_what_to_run(
    unpacked: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [str(unpacked / "usr/bin/neuron"), "info"],
        env=packaged_env(HELEXA_PYTHON=str(tmp_path / "no-venv/bin/python3")),
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 78  # the unit's RestartPreventExitStatus
    assert "/usr/libexec/helexa-neuron/install-venv" in done.stderr


async def test_packaged_neuron_notifies_ready_serves_then_stopping_unloads_and_exits_0(
    unpacked: Path,
    demo_dir: Path,
    notify_socket: NotifySocket,
    neurons: list[NeuronProcess],
    tmp_path: Path,
) -> None:
    neuron = packaged_neuron(
        unpacked, tmp_path, env={"NOTIFY_SOCKET": str(notify_socket.path)}
    ).start()
    neurons.append(neuron)
    assert neuron.proc is not None

    notify_socket.wait_for("READY=1", neuron.proc, 300, neuron.log())
    # READY=1 comes after activation: the model is loaded and health already SERVING.
    assert "default model ready model=smollm2" in neuron.log()
    async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        text, _, _ = await collect(
            pb_grpc.NeuronStub(channel),
            chat(DEMO_ID, "What is the capital of France?", max_tokens=32, temperature=0),
        )
    assert "Paris" in text
    assert "STOPPING=1" not in notify_socket.received

    neuron.send(signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1", neuron.proc, 30, neuron.log())
    assert neuron.wait_exit(within=60) == 0, neuron.log()
    log = neuron.log()
    assert (
        log.index("draining")
        < log.index("model unloaded model=smollm2")
        < log.index("neuron stopped")
    )
    assert notify_socket.received.index("READY=1") < notify_socket.received.index("STOPPING=1")
