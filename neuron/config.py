"""``NeuronConfig``: the neuron's settings, read from ``/etc/neuron/neuron.toml``.

Every key is documented in ``configs/neuron.example.toml``; an unknown key, a wrong type or a
bad value stops the neuron at start with one message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from helexa.configfile import (
    ConfigError,
    ShutdownConfig,
    check_address,
    check_log_level,
    load_file,
)
from helexa.modelspec import MAX_SPECULATIVE_TOKENS, SPECULATIVE, ModelSpec
from helexa.secretfiles import check_token
from neuron.errors import NotAllowed
from neuron.loadpolicy import check_source

DEFAULT_PATH = Path("/etc/neuron/neuron.toml")


@dataclass(frozen=True)
class DevicesConfig:
    """Which devices models may go on, and how much memory they may take there."""

    # "auto": every CUDA device, else the CPU. Or a list such as ["cuda:0", "cuda:1"] or ["cpu"].
    use: list[str] = field(default_factory=lambda: ["auto"])
    # Memory all models on the CPU may take together; None: 75% of physical memory.
    cpu_memory_budget: int | None = field(default=None, metadata={"unit": "bytes"})
    # Memory left free on each CUDA device for activations and KV caches.
    cuda_memory_reserve: int = field(default=2 << 30, metadata={"unit": "bytes"})
    # torch threads for CPU generation; 0: one per core.
    cpu_threads: int = 0

    def check_config(self, key: str) -> None:
        for i, name in enumerate(self.use):
            ok = name in ("auto", "cpu", "cuda") or (
                name.startswith("cuda:") and name[5:].isdigit()
            )
            if not ok:
                raise ConfigError(
                    f"{key}.use[{i}]: expected auto, cpu, cuda or cuda:N, got {name!r}"
                )
        if self.cpu_threads < 0:
            raise ConfigError(f"{key}.cpu_threads: must not be negative")


@dataclass(frozen=True)
class EngineConfig:
    """Batching limits for every model this neuron holds (a spec may lower max_batch_size)."""

    max_batch_size: int = 16
    # Requests waiting for a batch slot per model before new ones are refused (a spec may lower it).
    max_waiting: int = 256
    # Tokens each model's paged KV cache holds, all its rows together; 0: max_batch_size x
    # the model's context (no request ever waits for cache room). Fewer fit more models on a
    # device: a batch holds only the tokens it has, and when the cache is full the newest
    # request waits (preempted, its tokens run again) while the others go on.
    kv_cache_tokens: int = 0
    # Blocks of the KV cache no request holds any more kept per model for prompts that begin
    # the same way (such a prompt runs only its new tokens); 0: no prefix cache. Inside the
    # KV cache (a new request takes them back when it needs the room).
    prefix_cache: int = field(default=256 << 20, metadata={"unit": "bytes"})
    # Seconds a model with no batch running waits for another request before it runs the
    # prompts it has (at most 5 such windows), so requests that arrive together are
    # prefilled together; 0: at once.
    batch_window: float = 0.005
    # Speculative decoding for models whose spec does not say: "prompt_lookup" (drafts from
    # the row's own prompt and answer, verified in one step) or "off". Off: a verifying step's
    # attention rounds differently from a one-token step's, so a greedy answer could depend on
    # whether its row ran alone (gated to 1 row); a soak with it on once had one answer differ.
    speculative: str = "off"
    # Draft tokens a row may verify per step (a model's spec may say otherwise).
    speculative_tokens: int = 4
    # Rows a model's batch may have for its rows to verify drafts; at more, every row decodes
    # a token a step (a verifying step widens every row of the batch: at 2 rows chat answers
    # ran 0.82x plain, at 1 row even; BENCHMARKS.md 8).
    speculative_max_rows: int = 1

    def check_config(self, key: str) -> None:
        if self.speculative not in SPECULATIVE:
            raise ConfigError(f"{key}.speculative: must be one of {', '.join(SPECULATIVE)}")
        if not 1 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(
                f"{key}.speculative_tokens: must be between 1 and {MAX_SPECULATIVE_TOKENS}"
            )
        if self.speculative_max_rows < 1:
            raise ConfigError(f"{key}.speculative_max_rows: must be at least 1")
        if not 0 <= self.batch_window <= 1:
            raise ConfigError(f"{key}.batch_window: must be between 0 and 1 second")
        if self.kv_cache_tokens < 0:
            raise ConfigError(f"{key}.kv_cache_tokens: must not be negative")
        if self.prefix_cache < 0:
            raise ConfigError(f"{key}.prefix_cache: must not be negative")
        if self.max_batch_size < 1:
            raise ConfigError(f"{key}.max_batch_size: must be at least 1")
        if self.max_waiting < 1:
            raise ConfigError(f"{key}.max_waiting: must be at least 1")


@dataclass(frozen=True)
class AuthConfig:
    """The token every call but grpc.health.v1 must carry (``authorization: Bearer TOKEN``);
    neither set: no token is asked for."""

    token: str = ""
    # A file holding the token on one line ('#' comments and blank lines skipped).
    token_file: str = ""
    # Serve beyond loopback with neither a token nor mTLS; else such a neuron refuses to start.
    allow_unauthenticated: bool = False

    def check_config(self, key: str) -> None:
        check_token(self.token, self.token_file, key)


@dataclass(frozen=True)
class LoadingConfig:
    """What a load may read or fetch, and how long a failed load stays listed."""

    # Local sources only under these directories (and cache_dir), by their real paths.
    local_dirs: list[str] = field(default_factory=lambda: ["/var/lib/neuron/local"])
    # Hugging Face repositories that may be loaded ("owner/name" or "owner/*"); empty: any.
    hf_repos: list[str] = field(default_factory=list)
    # Seconds a FAILED model stays listed (with its error) before it is forgotten.
    failed_ttl: float = 600.0

    def check_config(self, key: str) -> None:
        for i, folder in enumerate(self.local_dirs):
            if not folder.strip():
                raise ConfigError(f"{key}.local_dirs[{i}]: must not be empty")
        for i, repo in enumerate(self.hf_repos):
            owner, slash, name = repo.partition("/")
            if not (owner and slash and name) or "/" in name:
                raise ConfigError(
                    f"{key}.hf_repos[{i}]: expected owner/name or owner/*, got {repo!r}"
                )
        if not 0 <= self.failed_ttl < float("inf"):
            raise ConfigError(f"{key}.failed_ttl: must be 0 or more seconds")


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the gRPC port; with ``client_ca_file``, callers must show a certificate it signed."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def check_config(self, key: str) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError(f"{key}.key_file: cert_file and key_file go together")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError(f"{key}.client_ca_file: needs cert_file and key_file (TLS)")


@dataclass(frozen=True)
class NeuronConfig:
    """Everything ``neuron serve`` reads from its config file."""

    listen: str = "0.0.0.0:13131"
    metrics_listen: str = "0.0.0.0:13132"
    cache_dir: str = "/var/lib/neuron/models"
    log_level: str = "info"
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    loading: LoadingConfig = field(default_factory=LoadingConfig)
    default_models: list[ModelSpec] = field(default_factory=list)

    def check_config(self, key: str) -> None:
        check_address(self.listen, "listen")
        check_address(self.metrics_listen, "metrics_listen")
        check_log_level(self.log_level)
        seen: set[str] = set()
        # Each spec was checked as the loader built it (ModelSpec.check_config).
        for i, spec in enumerate(self.default_models):
            if spec.id in seen:
                raise ConfigError(f"default_models[{i}].id: {spec.id!r} is listed twice")
            seen.add(spec.id)
        for i, spec in enumerate(self.default_models):
            try:
                check_source(spec, self.local_dirs, self.loading.hf_repos, f"default_models[{i}]")
            except NotAllowed as e:
                raise ConfigError(str(e)) from None

    @property
    def local_dirs(self) -> list[str]:
        """Where local sources may lie: the cache and ``loading.local_dirs``."""
        return [self.cache_dir, *self.loading.local_dirs]


def load(path: Path = DEFAULT_PATH) -> NeuronConfig:
    """Read and check the config file; raises ``ConfigError`` naming the file and key."""
    return load_file(NeuronConfig, path)
