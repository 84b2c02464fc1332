"""cortex's config: every shipped file parses with the real loader; bad keys are named; and
cortex imports nothing of torch or the neuron."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cortex.config import (
    Catalogue,
    CortexConfig,
    load,
    load_catalogue,
    load_config,
)
from helexa.configfile import ConfigError
from tests.harness import run_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").glob("cortex*.toml")), ids=lambda p: p.name
)
def test_every_shipped_cortex_config_parses(path: Path) -> None:
    assert isinstance(load_config(path), CortexConfig)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").glob("models*.toml")), ids=lambda p: p.name
)
def test_every_shipped_models_config_parses(path: Path) -> None:
    assert isinstance(load_catalogue(path), Catalogue)


def test_demo_configs_load_together_as_make_run_uses_them() -> None:
    config, catalogue = load(ROOT / "configs/cortex.demo.toml")
    assert config.listen == "127.0.0.1:31313"
    assert config.metrics_listen == "127.0.0.1:31314"
    assert [(n.name, n.endpoint) for n in config.neurons] == [("local", "127.0.0.1:13131")]
    entry = catalogue.find("smollm2-135m-instruct")
    assert entry is not None and entry.pinned
    neuron_demo = (ROOT / "configs/neuron.demo.toml").read_text()
    assert f'id = "{entry.id}"' in neuron_demo and f'path = "{entry.path}"' in neuron_demo


def test_defaults_match_the_documented_ports() -> None:
    config = CortexConfig()
    assert config.listen == "0.0.0.0:31313"
    assert config.metrics_listen == "0.0.0.0:31314"


def _uncomment(text: str, start: str) -> str:
    """The commented-out block starting at ``start``, up to its first uncommented line."""
    lines = []
    for line in text[text.index(start) :].splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# ") and not line.startswith("# #"):
            lines.append(line[2:])
    return "\n".join(lines) + "\n"


def test_example_configs_document_every_key(tmp_path: Path) -> None:
    cortex_text = (ROOT / "configs/cortex.example.toml").read_text()
    for key in [
        "listen", "metrics_listen", "models_file", "log_level", "name", "endpoint",
        "poll_interval", "down_after_failures", "rpc_timeout", "keepalive_time",
        "keepalive_timeout", "request", "load", "stall", "keepalive", "queue", "accept",
        "retry_after", "retry_after_max", "max_tokens", "max_body", "keys", "keys_file",
        "allow_unauthenticated", "max_concurrent", "requests_per_minute", "drain_timeout",
        "token", "token_file", "ca_file", "cert_file", "key_file", "server_name",
        "max_stored", "max_age", "max_bytes",
    ]:  # fmt: skip
        assert f"{key} =" in cortex_text, key
    assert "[admin]" in cortex_text
    models_text = (ROOT / "configs/models.example.toml").read_text()
    for key in [
        "id", "aliases", "hf_repo", "revision", "path", "gguf_file", "dtype", "device",
        "max_batch_size", "max_context", "max_waiting", "memory", "neurons", "pinned",
        "speculative", "speculative_tokens",
    ]:  # fmt: skip
        assert f"{key} =" in models_text, key
    # The commented blocks, uncommented, load with the real loader.
    (tmp_path / "cortex.toml").write_text(_uncomment(cortex_text, "# [[neurons]]"))
    (tmp_path / "models.toml").write_text(_uncomment(models_text, "# [[models]]"))
    config, catalogue = load(tmp_path / "cortex.toml")
    assert config.neurons[0].name == "gpu-host-1"
    assert catalogue.models[0].id == "smollm2-135m-instruct"
    assert catalogue.models[0].memory == 340 << 20


@pytest.mark.parametrize(
    ("cortex", "models", "named"),
    [
        ("listn = '0.0.0.0:1'", "", "listn: unknown key"),
        ("[[nodes]]\nname = 'a'", "", "nodes: unknown key"),
        ("[fleet]\npoll_interval = 'soon'", "", "fleet.poll_interval: expected a number"),
        ("[fleet]\nkeepalive_time = 1", "", "fleet.keepalive_time"),
        ("[timeouts]\nstall = 0", "", "timeouts.stall"),
        ("[timeouts]\nqueue = 0", "", "timeouts.queue"),
        ("[responses]\nmax_stored = -1", "", "responses.max_stored"),
        ("[responses]\nmax_age = 0", "", "responses.max_age"),
        ("[responses]\nmax_bytes = '1KB'", "", "responses.max_bytes"),
        ("[responses]\nkeep = 5", "", "responses.keep: unknown key"),
        ("[timeouts]\nretry_after = 10\nretry_after_max = 5", "", "timeouts.retry_after_max"),
        ("[[neurons]]\nname = 'a'\nendpoint = 'nowhere'", "", "neurons[0].endpoint"),
        ("[[neurons]]\nendpoint = 'h:1'", "", "neurons[0].name: required key is missing"),
        (
            "[[neurons]]\nname='a'\nendpoint='h:1'\n[[neurons]]\nname='a'\nendpoint='h:2'",
            "",
            "neurons[1].name",
        ),
        ("", "[[models]]\nid = 'm'\nmemory = '1GiB'", "models[0].source"),
        ("", "[[models]]\nid = 'm'\npath = '/x'", "models[0].memory"),
        ("", "[[models]]\nid = 'm'\npath = '/x'\nmemory = 'lots'", "models[0].memory"),
        ("", "[[models]]\nid = 'm'\npath = '/x'\nmemory = 1\npinnned = true", "models[0].pinnned"),
        ("", "[[models]]\nid='m'\npath='/x'\nmemory=1\nneurons=['ghost']", "models[0].neurons[0]"),
        (
            "",
            "[[models]]\nid='m'\npath='/x'\nmemory=1\n[[models]]\nid='n'\npath='/y'\nmemory=1\naliases=['m']",
            "models[1].aliases[0]",
        ),
        ("listen = ", "", "not valid TOML"),
        ("[auth]\napi_keys = ['k']", "", "auth.api_keys: unknown key"),
        ("[auth]\nkeys = ['   ']", "", "auth.keys[0]"),
        ("[auth]\nkeys = ['']", "", "auth.keys[0]"),
        ("[auth]\nmax_concurrent = -1", "", "auth.max_concurrent"),
        ("[auth]\nrequests_per_minute = 'many'", "", "auth.requests_per_minute"),
        ("[admin]\nkeys = ['key-without-a-name']", "", "admin.keys[0]: must be 'NAME KEY'"),
        ("[admin]\nkeys = ['bad/name key']", "", "admin.keys[0]: must be 'NAME KEY'"),
        ("[admin]\nkeys = ['ops']", "", "admin.keys[0]: must be 'NAME KEY'"),
        ("[admin]\ntoken = 't'", "", "admin.token: unknown key"),
        ("[fleet]\ncert_file = '/c'", "", "fleet.key_file"),
        ("[fleet]\ncert_file = '/c'\nkey_file = '/k'", "", "fleet.ca_file"),
        ("[fleet]\ntoken = 'has space'", "", "fleet.token"),
        (
            "[[neurons]]\nname='a'\nendpoint='h:1'\ntoken='t'\ntoken_file='/t'",
            "",
            "neurons[0].token",
        ),
        ("[[neurons]]\nname='a'\nendpoint='h:1'\ntls=true", "", "neurons[0].tls: unknown key"),
    ],
)
def test_bad_config_is_one_error_naming_the_key(
    tmp_path: Path, cortex: str, models: str, named: str
) -> None:
    (tmp_path / "cortex.toml").write_text(cortex + "\n")
    (tmp_path / "models.toml").write_text(models + "\n")
    with pytest.raises(ConfigError) as error:
        load(tmp_path / "cortex.toml")
    assert named in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_cortex_serve_with_bad_config_exits_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "cortex.toml").write_text("[fleet]\npoll_intervall = 1\n")
    (tmp_path / "models.toml").write_text("")
    result = run_cli("cortex", "serve", tmp_path / "cortex.toml")
    assert result.returncode != 0
    assert "fleet.poll_intervall" in result.stderr


def test_cortex_check_config_accepts_the_demo() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cortex.cli",
            "check-config",
            "--config",
            "configs/cortex.demo.toml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_cortex_imports_neither_torch_nor_neuron() -> None:
    modules = sorted(
        "cortex." + ".".join(p.relative_to(ROOT / "cortex").with_suffix("").parts)
        for p in (ROOT / "cortex").rglob("*.py")
    )
    modules = [m.removesuffix(".__init__") for m in modules]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'neuron', 'huggingface_hub', 'accelerate'))\n"
        "assert not bad, bad\n"
        "print(len(sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert len(modules) >= 9, modules


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[auth]\nkeys_file = '{missing}'", "auth.keys_file: cannot read"),
        ("[auth]\nkeys_file = '{comments}'", "auth.keys_file"),
        ("[admin]\nkeys_file = '{missing}'", "admin.keys_file: cannot read"),
        ("[admin]\nkeys_file = '{comments}'", "admin.keys_file"),
        ("[fleet]\ntoken_file = '{missing}'", "fleet.token_file: cannot read"),
        (
            "[[neurons]]\nname = 'a'\nendpoint = 'h:1'\nca_file = '{missing}'",
            "neurons[0].ca_file: cannot read",
        ),
    ],
)
def test_check_config_reads_the_secret_files_and_names_a_bad_one(
    tmp_path: Path, text: str, named: str
) -> None:
    (tmp_path / "comments").write_text("# no key yet\n\n")
    config = text.format(missing=tmp_path / "nope", comments=tmp_path / "comments")
    (tmp_path / "cortex.toml").write_text(config + "\n")
    (tmp_path / "models.toml").write_text("")
    result = run_cli("cortex", "check-config", tmp_path / "cortex.toml")
    assert result.returncode == 2
    assert named in result.stderr
