"""cortex as its RPM installs it, in front of the neuron as its RPM installs it.

Both packages' files are unpacked into a tmp root; /usr/bin/cortex and /usr/bin/neuron run from
there, cortex with the virtualenv its install-venv makes for real from a local wheelhouse and
neuron with the test virtualenv's Python (``HELEXA_PYTHON``), each with its packaged example
config changed only where a test must: free loopback ports, the neuron cortex routes to, the
demo model in the catalogue. ``NOTIFY_SOCKET`` points at a datagram socket the test owns, as
systemd's does for cortex.service (Type=notify).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import openai

from tests.harness import (
    DEMO_ID,
    PACKAGED_ENV,
    CortexProcess,
    NeuronProcess,
    NotifySocket,
    catalogue_model,
    free_port,
    packaged_neuron,
)


def run_packaged_cortex(unpacked: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(unpacked / "usr/bin/cortex"), *args],
        env={**os.environ, **PACKAGED_ENV}, cwd=cwd, capture_output=True, text=True,
    )  # fmt: skip


def test_packaged_cortex_launcher_runs_the_packaged_code(unpacked: Path, tmp_path: Path) -> None:
    lib = unpacked / "usr/lib/helexa-cortex"
    done = subprocess.run(
        [sys.executable, "-P", "-c", "import cortex.api, helexa; print(cortex.api.__file__, helexa.__file__)"],
        env={**os.environ, "PYTHONPATH": str(lib)},
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == [
        str(lib / "cortex/api/__init__.py"),
        str(lib / "helexa/__init__.py"),
    ]
    launcher = (unpacked / "usr/bin/cortex").read_text()
    assert 'PYTHONPATH="$lib' in launcher and '-P -m cortex.cli "$@"' in launcher


def test_packaged_cortex_launcher_runs_the_cortex_cli(unpacked: Path, tmp_path: Path) -> None:
    done = run_packaged_cortex(unpacked, tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout


def test_packaged_cortex_example_configs_pass_check_config(unpacked: Path, tmp_path: Path) -> None:
    config = unpacked / "etc/cortex/cortex.toml"
    done = run_packaged_cortex(unpacked, tmp_path, "check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"{config}: ok (0 neurons); {unpacked / 'etc/cortex/models.toml'}: ok (0 models)"
    )


def test_install_venv_makes_the_virtualenv_from_the_packaged_requirements(
    unpacked: Path, cortex_venv: Path, tmp_path: Path
) -> None:
    requirements = unpacked / "usr/share/helexa-cortex/requirements.txt"
    python = str(cortex_venv / "bin/python3")
    freeze = subprocess.run(
        [python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout
    installed = {line.split("==")[0].lower().replace("_", "-") for line in freeze.split()}
    wanted = {
        re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements.read_text().split()
    }
    assert wanted <= installed, wanted - installed
    # cortex's dependencies only: no torch, and not helexa itself (the package ships its code).
    assert not {"torch", "transformers", "helexa"} & installed
    stamp = (cortex_venv / ".requirements.sha256").read_text().strip()
    assert stamp == hashlib.sha256(requirements.read_bytes()).hexdigest()
    # The launcher runs the packaged code with it.
    done = subprocess.run(
        [str(unpacked / "usr/bin/cortex"), "--help"],
        env={**os.environ, "HELEXA_PYTHON": python, "PYTHONPATH": ""},
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout


async def test_packaged_cortex_notifies_ready_serves_through_packaged_neuron_then_stopping_exits_0(
    unpacked: Path,
    cortex_venv: Path,
    demo_dir: Path,
    notify_socket: NotifySocket,
    neurons: list[NeuronProcess],
    tmp_path: Path,
) -> None:
    neuron = packaged_neuron(unpacked, tmp_path).start()
    neurons.append(neuron)
    await neuron.wait_serving(within=300)

    # The packaged examples as an operator would edit them: the example listens on 0.0.0.0 at
    # the fixed ports, so here free loopback ports; one neuron; the demo model in the catalogue.
    config = tomllib.loads((unpacked / "etc/cortex/cortex.toml").read_text())
    config |= {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
        "neurons": [{"name": "packaged", "endpoint": neuron.endpoint}],
    }
    models = tomllib.loads((unpacked / "etc/cortex/models.toml").read_text())
    assert config["models_file"] == "models.toml"  # CortexProcess writes it beside cortex.toml
    cortex = CortexProcess(
        tmp_path / "cortex",
        config,
        models=[*models.get("models", []), catalogue_model(DEMO_ID)],
        # The virtualenv install-venv made, as on a host (the neuron runs with the tests').
        env={
            **PACKAGED_ENV,
            "HELEXA_PYTHON": str(cortex_venv / "bin/python3"),
            "NOTIFY_SOCKET": str(notify_socket.path),
        },
        program=[str(unpacked / "usr/bin/cortex")],
        cwd=tmp_path,
    ).start()
    try:
        assert cortex.proc is not None
        notify_socket.wait_for("READY=1", cortex.proc, 60, cortex.log())
        assert "cortex serving" in cortex.log() and "up=1" in cortex.log()

        client = openai.AsyncOpenAI(base_url=cortex.api_url, api_key="unused", max_retries=0)
        reply = await client.chat.completions.create(
            model=DEMO_ID,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=32,
        )
        await client.close()
        assert "Paris" in (reply.choices[0].message.content or "")
        assert "STOPPING=1" not in notify_socket.received

        cortex.send(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1", cortex.proc, 30, cortex.log())
        assert cortex.wait_exit(within=60) == 0, cortex.log()
        log = cortex.log()
        assert log.index("cortex serving") < log.index("draining") < log.index("cortex stopped")
        received = notify_socket.received
        assert received.index("READY=1") < received.index("STOPPING=1")
    finally:
        cortex.stop()
