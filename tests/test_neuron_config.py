"""neuron's config: every shipped file parses with the real loader; bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from helexa.configfile import ConfigError, parse_bytes
from neuron.config import NeuronConfig, load
from tests.harness import run_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").glob("neuron*.toml")), ids=lambda p: p.name
)
def test_every_shipped_neuron_config_parses(path: Path) -> None:
    config = load(path)
    assert isinstance(config, NeuronConfig)


def test_example_config_documents_every_key() -> None:
    text = (ROOT / "configs/neuron.example.toml").read_text()
    for key in [
        "listen", "metrics_listen", "cache_dir", "log_level", "use", "cpu_memory_budget",
        "cuda_memory_reserve", "cpu_threads", "max_batch_size", "max_waiting", "drain_timeout",
        "default_models", "hf_repo", "revision", "gguf_file", "path", "dtype", "device",
        "max_context", "token", "token_file", "cert_file", "key_file", "client_ca_file",
        "kv_cache_tokens", "prefix_cache", "batch_window", "allow_unauthenticated", "local_dirs",
        "hf_repos",
        "failed_ttl", "speculative", "speculative_tokens", "speculative_max_rows",
    ]:  # fmt: skip
        assert f"{key} =" in text or f"[[{key}]]" in text, key
    assert text.count("max_waiting =") == 2, "engine.max_waiting and a default model's"
    assert text.count("speculative =") == 2, "engine.speculative and a default model's"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "neuron.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("listn = '0.0.0.0:1'", "listn: unknown key"),
        ("[engine]\nmax_batch = 4", "engine.max_batch: unknown key"),
        ("[engine]\nmax_batch_size = 'four'", "engine.max_batch_size: expected an integer"),
        ("[engine]\nmax_batch_size = 0", "engine.max_batch_size: must be at least 1"),
        ("[engine]\nmax_waiting = 0", "engine.max_waiting: must be at least 1"),
        ("[engine]\nkv_cache_tokens = -1", "engine.kv_cache_tokens: must not be negative"),
        ("[engine]\nbatch_window = 2.5", "engine.batch_window: must be between 0 and 1 second"),
        ("[engine]\nspeculative = 'medusa'", "engine.speculative: must be one of off"),
        ("[engine]\nspeculative_tokens = 0", "engine.speculative_tokens: must be between 1"),
        ("[engine]\nspeculative_max_rows = 0", "engine.speculative_max_rows: must be at least 1"),
        (
            "[[default_models]]\nid='m'\npath='/x'\nspeculative='ngram'",
            "default_models[0].speculative",
        ),
        ("[[default_models]]\nid='m'\npath='/x'\nmax_waiting=-1", "default_models[0].max_waiting"),
        ("[shutdown]\ndrain_timeout = -1", "shutdown.drain_timeout"),
        ("listen = 'nowhere'", "listen: expected HOST:PORT"),
        ("[devices]\ncpu_memory_budget = 'lots'", "devices.cpu_memory_budget"),
        ("[devices]\nuse = ['tpu']", "devices.use[0]"),
        ("[[default_models]]\nid = 'm'", "default_models[0].source"),
        ("[[default_models]]\npath = '/x'", "default_models[0].id: required key is missing"),
        ("[[default_models]]\nid = 'm'\npath = '/x'\ndtype = 'int3'", "default_models[0].dtype"),
        (
            "[[default_models]]\nid='m'\npath='/x'\n[[default_models]]\nid='m'\npath='/y'",
            "default_models[1].id",
        ),
        (
            "[[default_models]]\nid = 'm'\npath = '/x'\nsource = 'hf'",
            "default_models[0].source: unknown key",
        ),
        ("listen = ", "not valid TOML"),
        ("[auth]\ntoken = 'two words'", "auth.token"),
        ("[auth]\ntoken = 't'\ntoken_file = '/t'", "auth.token: give token or token_file"),
        ("[tls]\ncert_file = '/c'", "tls.key_file"),
        ("[tls]\nclient_ca_file = '/c'", "tls.client_ca_file"),
        ("[tls]\nca_file = '/c'", "tls.ca_file: unknown key"),
        ("[auth]\nallow_unauthenticated = 'yes'", "auth.allow_unauthenticated: expected true"),
        ("[loading]\nlocal_dirs = ['']", "loading.local_dirs[0]: must not be empty"),
        ("[loading]\nhf_repos = ['just-a-name']", "loading.hf_repos[0]: expected owner/name"),
        ("[loading]\nhf_repos = ['a/b/c']", "loading.hf_repos[0]"),
        ("[loading]\nfailed_ttl = -1", "loading.failed_ttl: must be 0 or more"),
        ("[loading]\nfailed_ttl = nan", "loading.failed_ttl"),
        (
            "[loading]\nlocal_dirs = ['/srv/models']\n[[default_models]]\nid='m'\npath='/etc/x'",
            "default_models[0].path '/etc/x': not under cache_dir or a directory in "
            "loading.local_dirs",
        ),
        (
            "[loading]\nhf_repos = ['a/*']\n[[default_models]]\nid='m'\nhf_repo='b/c'",
            "default_models[0].hf_repo 'b/c': not in loading.hf_repos",
        ),
    ],
)
def test_bad_config_is_one_error_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load(path)
    assert named in str(error.value)
    assert str(path) in str(error.value)


def test_neuron_serve_with_bad_config_exits_with_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "[engine]\nmax_batch_size = 'four'\n")
    result = run_cli("neuron", "serve", path)
    assert result.returncode == 2
    assert "engine.max_batch_size" in result.stderr


def test_sizes_parse_with_units() -> None:
    assert parse_bytes("8GiB", "k") == 8 << 30
    assert parse_bytes("512 MiB", "k") == 512 << 20
    assert parse_bytes("2GB", "k") == 2_000_000_000
    assert parse_bytes(1024, "k") == 1024
    with pytest.raises(ConfigError):
        parse_bytes(-1, "k")


def test_defaults_match_the_documented_ports() -> None:
    config = NeuronConfig()
    assert config.listen == "0.0.0.0:13131"
    assert config.metrics_listen == "0.0.0.0:13132"
    assert config.cache_dir == "/var/lib/neuron/models"


def test_commented_default_model_in_example_parses(tmp_path: Path) -> None:
    # The example's [[default_models]] block is commented out; uncommented, it must load.
    text = (ROOT / "configs/neuron.example.toml").read_text()
    block = text[text.index("# [[default_models]]") :]
    lines = [
        line[2:]
        for line in block.splitlines()
        if line.startswith("# ") and not line.startswith("# #")
    ]
    config = load(_write(tmp_path, "\n".join(lines)))
    (spec,) = config.default_models
    assert spec.hf_repo == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[auth]\ntoken_file = '{missing}'", "auth.token_file: cannot read"),
        ("[auth]\ntoken_file = '{two_lines}'", "auth.token_file"),
        ("[tls]\ncert_file = '{missing}'\nkey_file = '{two_lines}'", "tls.cert_file: cannot read"),
    ],
)
def test_check_config_reads_the_secret_files_and_names_a_bad_one(
    tmp_path: Path, text: str, named: str
) -> None:
    (tmp_path / "two").write_text("token-one\ntoken-two\n")
    path = _write(tmp_path, text.format(missing=tmp_path / "nope", two_lines=tmp_path / "two"))
    result = run_cli("neuron", "check-config", path)
    assert result.returncode == 2
    assert named in result.stderr
    assert "token-one" not in result.stderr
