"""systemd units, sysusers and firewalld files, checked as the packages install them.

``systemd-analyze verify`` runs with ``--root`` on the unpacked packages, so it finds the unit
files and checks that ExecStart's /usr/bin/<program> exists (and is executable) where the unit
says; the root also gets the host's own systemd units (the targets the units refer to), since
verify fails on a unit whose dependencies it cannot load, and the host's ``kill`` (ExecReload).
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.harness import ROOT
from tests.packages import PROGRAMS, require_tools

HOST_UNITS = [Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")]
# `systemd-analyze security` exposure (0 safest, 10 unsafe): what the units reach now, so that
# a change that loosens them fails here. The neuron needs the NVIDIA devices and W+X memory.
MAX_EXPOSURE = {"neuron": 2.0, "cortex": 1.5}
PORTS = {
    "helexa-cortex": "31313",
    "helexa-cortex-metrics": "31314",
    "helexa-neuron": "13131",
    "helexa-neuron-metrics": "13132",
}


def unit(program: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / f"deploy/systemd/{program}.service")
    return parser


@pytest.fixture(scope="module")
def verify_root(unpacked: Path) -> Path:
    require_tools("systemd-analyze")
    units = unpacked / "usr/lib/systemd/system"
    for host in HOST_UNITS:
        if host.is_dir():
            for path in host.iterdir():
                if path.is_file() and not (units / path.name).exists():
                    shutil.copy2(path, units / path.name)
            break
    # What the host provides for ExecReload (cortex: /bin/kill -HUP $MAINPID), as the OS would.
    kill = shutil.which("kill", path="/usr/bin:/bin")
    assert kill is not None, "no kill program on this host"
    (unpacked / "bin").mkdir(exist_ok=True)
    if not (unpacked / "bin/kill").exists():
        shutil.copy2(kill, unpacked / "bin/kill")
    return unpacked


@pytest.mark.parametrize("program", PROGRAMS)
def test_systemd_analyze_verify_accepts_the_packaged_unit(verify_root: Path, program: str) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={verify_root}", f"{program}.service"],
        capture_output=True,
        text=True,
    )
    # verify exits 0 on unknown keys and bad values, but warns: any output is a failure.
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        done.stdout + done.stderr
    )


@pytest.mark.parametrize("program", PROGRAMS)
def test_systemd_analyze_verify_fails_without_the_program(
    verify_root: Path, program: str, tmp_path: Path
) -> None:
    """The check above is real: the same unit with its ExecStart program gone is refused."""
    program_path = verify_root / f"usr/bin/{program}"
    program_path.rename(tmp_path / program)
    try:
        done = subprocess.run(
            [
                "systemd-analyze",
                "verify",
                "--man=no",
                f"--root={verify_root}",
                f"{program}.service",
            ],
            capture_output=True,
            text=True,
        )
    finally:
        (tmp_path / program).rename(program_path)
    assert done.returncode != 0 and f"/usr/bin/{program}" in done.stderr


@pytest.mark.parametrize("program", PROGRAMS)
def test_unit_hardening_exposure_stays_low(program: str) -> None:
    require_tools("systemd-analyze")
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(ROOT / f"deploy/systemd/{program}.service")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    found = re.search(rf"Overall exposure level for {program}\.service: ([\d.]+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found[1]) <= MAX_EXPOSURE[program], done.stdout


@pytest.mark.parametrize("program", PROGRAMS)
def test_unit_runs_the_daemon_as_its_user_with_notify_and_drain(program: str) -> None:
    service = unit(program)["Service"]
    assert service["Type"] == "notify"
    assert (
        service["ExecStart"] == f"/usr/bin/{program} serve --config /etc/{program}/{program}.toml"
    )
    assert service["User"] == service["Group"] == service["StateDirectory"] == program
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == service["ProtectHome"] == service["PrivateTmp"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert unit(program)["Install"]["WantedBy"] == "multi-user.target"


def test_neuron_unit_waits_for_model_loads_and_outlasts_the_drain() -> None:
    service = unit("neuron")["Service"]
    assert service["TimeoutStartSec"] == "1800"
    drain = _example_drain_timeout()
    # After drain_timeout, cancelled streams get up to 10 s (lifecycle), then models unload.
    assert int(service["TimeoutStopSec"]) >= drain + 10 + 60
    # CUDA devices stay reachable: no PrivateDevices, an explicit allow list instead.
    assert "PrivateDevices" not in service and service["DevicePolicy"] == "closed"
    text = (ROOT / "deploy/systemd/neuron.service").read_text()
    for group in ("char-nvidia-frontend", "char-nvidia-uvm"):
        assert f"DeviceAllow={group} rw" in text


def test_cortex_unit_has_no_devices_and_outlasts_its_drain() -> None:
    service = unit("cortex")["Service"]
    assert service["PrivateDevices"] == "yes"
    example = tomllib.loads((ROOT / "configs/cortex.example.toml").read_text())
    drain = float(example["shutdown"]["drain_timeout"])
    assert int(service["TimeoutStopSec"]) >= drain + 30


def _example_drain_timeout() -> float:
    config = tomllib.loads((ROOT / "configs/neuron.example.toml").read_text())
    return float(config["shutdown"]["drain_timeout"])


@pytest.mark.parametrize("program", PROGRAMS)
def test_sysusers_file_makes_the_user_with_its_state_dir_as_home(program: str) -> None:
    lines = [
        line.split()
        for line in (ROOT / f"deploy/sysusers/{program}.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == 1
    line = " ".join(lines[0])
    assert re.fullmatch(rf'u {program} - "[^"]+" /var/lib/{program} -', line), line
    # systemd's own parser: it refuses what the pattern cannot see (a bad specifier, say).
    require_tools("systemd-sysusers")
    done = subprocess.run(
        ["systemd-sysusers", "--dry-run", "--root=/nonexistent", str(ROOT / f"deploy/sysusers/{program}.conf")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"Creating user '{program}'" in done.stdout + done.stderr, done.stderr


@pytest.mark.parametrize("service", sorted(PORTS))
def test_firewalld_service_opens_its_one_port(unpacked: Path, service: str) -> None:
    tree = ET.parse(unpacked / f"usr/lib/firewalld/services/{service}.xml")
    root = tree.getroot()
    assert root.tag == "service"
    assert root.findtext("short") and root.findtext("description")
    ports = [(p.get("protocol"), p.get("port")) for p in root.findall("port")]
    assert ports == [("tcp", PORTS[service])]


def test_neuron_firewalld_ports_are_the_example_configs_ports() -> None:
    config = tomllib.loads((ROOT / "configs/neuron.example.toml").read_text())
    assert config["listen"].rsplit(":", 1)[1] == PORTS["helexa-neuron"]
    assert config["metrics_listen"].rsplit(":", 1)[1] == PORTS["helexa-neuron-metrics"]


def test_cortex_unit_reload_rereads_the_keys_file_with_sighup() -> None:
    assert unit("cortex")["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
