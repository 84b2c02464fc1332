"""The RPMs `make rpm` builds: their files, config flags, provides, requires and scriptlets."""

from __future__ import annotations

import gzip
import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import ROOT
from tests.packages import PROGRAMS, Package, require_tools

# What each package must hold, besides its Python code under /usr/lib/helexa-<program>/.
EXPECTED_FILES = {
    "neuron": {
        "/usr/bin/neuron",
        "/usr/lib/systemd/system/neuron.service",
        "/usr/lib/sysusers.d/neuron.conf",
        "/usr/lib/firewalld/services/helexa-neuron.xml",
        "/usr/lib/firewalld/services/helexa-neuron-metrics.xml",
        "/etc/neuron",
        "/etc/neuron/neuron.toml",
        "/var/lib/neuron",
        "/usr/libexec/helexa-neuron",
        "/usr/libexec/helexa-neuron/install-venv",
        "/usr/share/helexa-neuron",
        "/usr/share/helexa-neuron/requirements.txt",
        "/usr/share/doc/helexa-neuron",
        "/usr/share/doc/helexa-neuron/README.md",
        "/usr/share/man/man1/neuron.1.gz",
        "/usr/lib/helexa-neuron",
    },
    "cortex": {
        "/usr/bin/cortex",
        "/usr/lib/systemd/system/cortex.service",
        "/usr/lib/sysusers.d/cortex.conf",
        "/usr/lib/firewalld/services/helexa-cortex.xml",
        "/usr/lib/firewalld/services/helexa-cortex-metrics.xml",
        "/etc/cortex",
        "/etc/cortex/cortex.toml",
        "/etc/cortex/models.toml",
        "/var/lib/cortex",
        "/usr/libexec/helexa-cortex",
        "/usr/libexec/helexa-cortex/install-venv",
        "/usr/share/helexa-cortex",
        "/usr/share/helexa-cortex/requirements.txt",
        "/usr/share/doc/helexa-cortex",
        "/usr/share/doc/helexa-cortex/README.md",
        "/usr/share/man/man1/cortex.1.gz",
        "/usr/share/helexa-cortex/prometheus",
        "/usr/share/helexa-cortex/prometheus/prometheus.yml",
        "/usr/share/helexa-cortex/prometheus/helexa-alerts.yml",
        "/usr/share/helexa-cortex/grafana",
        "/usr/share/helexa-cortex/grafana/helexa.json",
        "/usr/lib/helexa-cortex",
    },
}
CONFIGS = {
    "neuron": ["/etc/neuron/neuron.toml"],
    "cortex": ["/etc/cortex/cortex.toml", "/etc/cortex/models.toml"],
}
# The other program: its code must not be in this package.
OTHER = {"neuron": "cortex", "cortex": "neuron"}
IMPORT = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_][\w]*)", re.MULTILINE)


@pytest.mark.parametrize("program", PROGRAMS)
def test_package_holds_its_program_unit_sysusers_firewalld_config_and_state_dir(
    rpms: dict[str, Package], program: str
) -> None:
    files = rpms[program].files()
    lib = f"/usr/lib/helexa-{program}/"
    assert set(files) - {f for f in files if f.startswith(lib)} == EXPECTED_FILES[program]
    code = {f.removeprefix(lib) for f in files if f.startswith(lib) and f.endswith(".py")}
    assert {
        "helexa/sdnotify.py",
        "helexa/neuron/v1/neuron_pb2_grpc.py",
        f"{program}/__init__.py",
        f"{program}/cli.py",
    } <= code
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


@pytest.mark.parametrize("program", PROGRAMS)
def test_package_has_no_code_of_the_other_program(
    rpms: dict[str, Package], unpacked: Path, program: str
) -> None:
    other = OTHER[program]
    lib = f"/usr/lib/helexa-{program}/"
    assert not [f for f in rpms[program].files() if f.startswith(f"{lib}{other}")]
    # Nor does its code import the other program (or torch, for cortex).
    forbidden = {other} | (
        {"torch", "transformers", "accelerate", "gguf"} if program == "cortex" else set()
    )
    for path in (unpacked / lib.strip("/")).rglob("*.py"):
        imported = set(IMPORT.findall(path.read_text()))
        assert not imported & forbidden, f"{path} imports {imported & forbidden}"


@pytest.mark.parametrize("program", PROGRAMS)
def test_configs_are_config_noreplace_readable_by_the_daemon_user(
    rpms: dict[str, Package], program: str
) -> None:
    assert rpms[program].query("-c").split() == CONFIGS[program]
    flags = rpms[program].file_flags()
    for path in CONFIGS[program]:
        assert flags[path] == ("cn", "-rw-r-----", f"root:{program}"), path  # c=config n=noreplace
    assert flags[f"/var/lib/{program}"] == ("", "drwxr-x---", f"{program}:{program}")
    assert flags[f"/usr/bin/{program}"][1:] == ("-rwxr-xr-x", "root:root")


def test_neuron_config_is_the_example_config(unpacked: Path) -> None:
    packaged = (unpacked / "etc/neuron/neuron.toml").read_bytes()
    assert packaged == (ROOT / "configs/neuron.example.toml").read_bytes()


@pytest.mark.parametrize("name", ["cortex", "models"])
def test_cortex_configs_are_the_example_configs(unpacked: Path, name: str) -> None:
    packaged = (unpacked / f"etc/cortex/{name}.toml").read_bytes()
    assert packaged == (ROOT / f"configs/{name}.example.toml").read_bytes()


@pytest.mark.parametrize("program", PROGRAMS)
def test_package_provides_its_user_and_group(rpms: dict[str, Package], program: str) -> None:
    provides = rpms[program].query("--provides").splitlines()
    # Versioned (rpmlint's unversioned-explicit-provides); an unversioned Requires matches them.
    version = rpms[program].query("--qf", "%{VERSION}-%{RELEASE}")
    assert f"user({program}) = {version}" in provides
    assert f"group({program}) = {version}" in provides
    assert not [p for p in provides if OTHER[program] in p]


def test_cortex_requires_no_torch_and_neuron_requirements_have_it(
    rpms: dict[str, Package], unpacked: Path
) -> None:
    for program in PROGRAMS:
        requires = rpms[program].query("--requires")
        assert "torch" not in requires and "python3 >= 3.11" in requires
    cortex = (unpacked / "usr/share/helexa-cortex/requirements.txt").read_text().split()
    neuron = (unpacked / "usr/share/helexa-neuron/requirements.txt").read_text().split()
    assert not [r for r in cortex if r.startswith(("torch", "transformers"))]
    assert "grpcio>=1.85.1" in cortex
    assert set(cortex) < set(neuron)
    assert [r for r in neuron if re.match(r"torch\b", r)] == ["torch>=2.4"]


@pytest.mark.parametrize("program", PROGRAMS)
def test_install_venv_is_made_for_its_program(unpacked: Path, program: str) -> None:
    script = unpacked / f"usr/libexec/helexa-{program}/install-venv"
    text = script.read_text()
    assert "@NAME@" not in text and f"name={program}\n" in text
    subprocess.run(["sh", "-n", str(script)], check=True)


FAKE_PYTHON = """#!/bin/sh
echo "$(basename "$(dirname "$(dirname "$0")")") $*" >> "$FAKE_LOG"
if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python3"; fi
"""


@pytest.mark.parametrize("wheelhouse", [None, "/srv/wheels"])
@pytest.mark.parametrize("program", PROGRAMS)
def test_install_venv_installs_torch_from_its_index_only_for_neuron(
    unpacked: Path, tmp_path: Path, program: str, wheelhouse: str | None
) -> None:
    """install-venv's pip calls, with a Python that records them instead of installing (a
    real install from a wheelhouse: test_packaged_cortex.py)."""
    fake = tmp_path / "host/bin/python3"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls"
    requirements = unpacked / f"usr/share/helexa-{program}/requirements.txt"
    done = subprocess.run(
        [str(unpacked / f"usr/libexec/helexa-{program}/install-venv")],
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHON": str(fake),
            "HELEXA_VENV": str(tmp_path / "venv"),
            "HELEXA_REQUIREMENTS": str(requirements),
            "FAKE_LOG": str(log),
            **({"HELEXA_WHEELHOUSE": wheelhouse} if wheelhouse else {}),
        },
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    source = (
        f"--no-index --find-links {wheelhouse}"
        if wheelhouse
        else "--index-url https://download.pytorch.org/whl/cu128"
    )
    only = f"--no-index --find-links {wheelhouse} " if wheelhouse else ""
    assert calls[1:] == [
        f"host -m venv {tmp_path / 'venv'}",
        *([f"venv -m pip install {source} torch>=2.4"] if program == "neuron" else []),
        f"venv -m pip install {only}--upgrade-strategy only-if-needed -r {requirements}",
        "venv -m pip check",
    ]
    # What the virtualenv was made from, for the package's restart after an upgrade.
    stamp = (tmp_path / "venv/.requirements.sha256").read_text().strip()
    assert stamp == hashlib.sha256(requirements.read_bytes()).hexdigest()


@pytest.mark.parametrize("program", PROGRAMS)
def test_scriptlets_create_the_user_and_manage_the_unit(
    rpms: dict[str, Package], program: str
) -> None:
    scripts = rpms[program].query("--scripts")
    sections = dict(
        re.findall(
            r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)", scripts, re.S | re.M
        )
    )
    expected = {"preinstall", "postinstall", "preuninstall", "postuninstall"}
    assert set(sections) == expected | ({"posttrans"} if program == "cortex" else set())
    # Built here without Fedora's macros: the fallbacks, with the sysusers file inlined.
    assert (
        f"systemd-sysusers --replace=/usr/lib/sysusers.d/{program}.conf -" in sections["preinstall"]
    )
    assert f"u {program} - " in sections["preinstall"]
    assert f"systemctl --no-reload preset {program}.service" in sections["postinstall"]
    assert f"systemctl --no-reload disable --now {program}.service" in sections["preuninstall"]
    assert "systemctl daemon-reload" in sections["postuninstall"]
    # An upgrade restarts cortex (seconds), never the neuron (a reload of every model), and
    # cortex only after the transaction, when its virtualenv matches the new requirements.
    assert "try-restart" not in sections["postuninstall"]
    if program == "cortex":
        posttrans = sections["posttrans"]
        assert "try-restart cortex.service" in posttrans
        assert ".requirements.sha256" in posttrans
        assert "/usr/share/helexa-cortex/requirements.txt" in posttrans
    for body in sections.values():
        subprocess.run(["sh", "-n"], input=body, text=True, check=True)


@pytest.mark.parametrize("program", PROGRAMS)
def test_spec_uses_fedora_systemd_macros_where_they_exist(program: str) -> None:
    """With systemd-rpm-macros' macros defined (stand-ins here), the spec calls them."""
    require_tools("rpmspec")
    stand_ins = ["sysusers_create_compat", "systemd_post", "systemd_preun", "systemd_postun"]
    defines = [arg for m in stand_ins for arg in ("--define", f"{m}() FEDORA_{m} %*")]
    parsed = subprocess.run(
        ["rpmspec", "-P", "--define", f"_sourcedir {ROOT}/deploy/sysusers", *defines, f"rpm/helexa-{program}.spec"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert f"FEDORA_sysusers_create_compat {ROOT}/deploy/sysusers/{program}.conf" in parsed
    for macro in stand_ins[1:]:
        assert f"FEDORA_{macro} {program}.service" in parsed
    # Only the restart after the transaction is the spec's own (no macro does it).
    scriptlets = parsed.split("%files")[0].split("%pre\n", 1)[1].split("%posttrans")[0]
    assert "systemctl" not in scriptlets


# Each program's commands, as its argparse parser names them.
COMMANDS = {
    "cortex": ["serve", "status", "check-config"],
    "neuron": ["serve", "info", "check-config"],
}


@pytest.mark.parametrize("program", PROGRAMS)
def test_man_page_is_the_programs_own_help(unpacked: Path, program: str) -> None:
    page = gzip.decompress((unpacked / f"usr/share/man/man1/{program}.1.gz").read_bytes()).decode()
    assert page.startswith(f".TH {program.upper()} 1 ")
    for command in COMMANDS[program]:
        assert "\n.SS " + command.replace("-", "\\-") + "\n" in page  # roff escapes "-"
    assert "\\-\\-config CONFIG" in page
    if program == "cortex":
        shipped = unpacked / "usr/share/helexa-cortex/prometheus"
        assert (shipped / "helexa-alerts.yml").read_bytes() == (
            ROOT / "deploy/prometheus/helexa-alerts.yml"
        ).read_bytes()


def test_rpmlint_finds_nothing_in_the_specs_and_packages(rpms: dict[str, Package]) -> None:
    """Nothing but what rpm/rpmlint.toml filters: Fedora's own filters, and the few choices
    it names with their reasons."""
    require_tools("rpmlint")
    topdir = rpms["cortex"].path.parents[2]
    targets = [
        *sorted((ROOT / "rpm").glob("*.spec")),
        *(package.path for package in rpms.values()),
        *sorted((topdir / "SRPMS").glob("*.src.rpm")),
    ]
    assert len(targets) == 6
    # One run per file: given two source packages at once, rpmlint 2.4 takes the spec of one
    # for a second spec of the other (multiple-specfiles).
    for target in targets:
        done = subprocess.run(
            ["rpmlint", "-c", str(ROOT / "rpm/rpmlint.toml"), str(target)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert " 0 errors, 0 warnings," in done.stdout, done.stdout
