"""cortex's settings: ``cortex.toml`` (addresses, neurons, timeouts) and ``models.toml``.

``models.toml`` is the catalogue: each model's id, aliases, the source spec sent to a neuron
on load, the memory it needs, the neurons allowed to hold it, and whether it is pinned.
Every key is documented in ``configs/cortex.example.toml`` and ``configs/models.example.toml``;
an unknown key, a wrong type or a bad value is one ``ConfigError`` naming the file and key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cortex.multiplex import MESSAGE_BYTES
from helexa.configfile import (
    ConfigError,
    ShutdownConfig,
    check_address,
    check_log_level,
    load_file,
)
from helexa.modelspec import ModelSpec
from helexa.secretfiles import check_secret, check_token

DEFAULT_PATH = Path("/etc/cortex/cortex.toml")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_positive(value: float, key: str) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value}")


@dataclass(frozen=True, kw_only=True)
class NeuronLink:
    """How cortex calls a neuron: the token it sends and TLS. Set in ``[fleet]`` for every neuron
    or in a ``[[neurons]]`` entry for that one: an entry that sets token or token_file uses its
    own token, one that sets any TLS key (ca_file, cert_file, key_file, server_name) its own TLS.
    """

    # Sent as gRPC metadata `authorization: Bearer TOKEN` (the neuron's [auth] token).
    token: str = ""
    token_file: str = ""
    # TLS: the CA that signed the neuron's certificate; set, cortex dials TLS only.
    ca_file: str = ""
    # mTLS: cortex's client certificate and key, for a neuron with tls.client_ca_file.
    cert_file: str = ""
    key_file: str = ""
    # The name the neuron's certificate must carry, if not the endpoint's host.
    server_name: str = ""

    @property
    def sets_token(self) -> bool:
        return bool(self.token or self.token_file)

    @property
    def sets_tls(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file or self.server_name)

    def check_link(self, key: str) -> None:
        check_token(self.token, self.token_file, key)
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError(f"{key}.key_file: cert_file and key_file go together")
        if self.sets_tls and not self.ca_file:
            raise ConfigError(f"{key}.ca_file: required for TLS (with cert_file or server_name)")


@dataclass(frozen=True)
class NeuronEndpoint(NeuronLink):
    """One neuron cortex talks to, at the endpoint given here (never one it advertises)."""

    name: str
    endpoint: str

    def check_config(self, key: str) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"{key}.name: letters, digits, '.', '_' and '-' only")
        check_address(self.endpoint, f"{key}.endpoint")
        self.check_link(key)


@dataclass(frozen=True)
class FleetConfig(NeuronLink):
    """How the poller keeps the neurons' state fresh, and how every neuron is called."""

    poll_interval: float = 2.0
    # Consecutive failed polls before a neuron is marked down.
    down_after_failures: int = 2
    # Deadline of each poll RPC (Health, Info, ListModels).
    rpc_timeout: float = 5.0
    # gRPC keepalive pings on each neuron's channel, so a vanished host fails an open stream.
    keepalive_time: float = 20.0
    keepalive_timeout: float = 10.0

    def check_config(self, key: str) -> None:
        self.check_link(key)
        for name in ("poll_interval", "rpc_timeout", "keepalive_time", "keepalive_timeout"):
            _check_positive(getattr(self, name), f"{key}.{name}")
        if self.keepalive_time < 5.0:
            # The neuron refuses pings more often than every 5 s (GOAWAY too_many_pings).
            raise ConfigError(f"{key}.keepalive_time: must be at least 5 seconds")
        if self.down_after_failures < 1:
            raise ConfigError(f"{key}.down_after_failures: must be at least 1")


@dataclass(frozen=True)
class TimeoutsConfig:
    """Bounds on the waits a request can meet."""

    # Deadline of one generation on a neuron, first token to last.
    request: float = 600.0
    # Deadline of one LoadModel or UnloadModel call (a cold download can take minutes).
    load: float = 900.0
    # A stream with no new token for this long ends with an error event.
    stall: float = 120.0
    # While waiting for tokens, an SSE comment is sent this often so proxies keep the stream.
    keepalive: float = 10.0
    # Most seconds a request waits in neurons' queues for a batch slot, over all its tries;
    # past it, a 503 with Retry-After (the neuron drops it before any token).
    queue: float = 30.0
    # Seconds a neuron has to take a request (its accepted event) before another is tried.
    accept: float = 10.0
    # Retry-After of a 503 while cortex drains, or when no completion has been seen lately to
    # measure how fast the queue drains.
    retry_after: int = 5
    # Largest Retry-After given (the measured one is clamped to 1..retry_after_max).
    retry_after_max: int = 60
    # A request's headers must all arrive within this many seconds of its first byte, and its
    # body within ``body`` seconds of its headers; else the connection is closed (a 408 for the
    # body).
    header: float = 10.0
    body: float = 30.0
    # A connection with no request for this long is closed.
    idle: float = 75.0
    # A write to a client that does not complete within this many seconds (it stopped
    # reading) drops the client and stops its generation.
    write: float = 30.0

    def check_config(self, key: str) -> None:
        for name in (
            "request",
            "load",
            "stall",
            "keepalive",
            "queue",
            "accept",
            "header",
            "body",
            "idle",
            "write",
        ):
            _check_positive(getattr(self, name), f"{key}.{name}")
        if self.retry_after < 1:
            raise ConfigError(f"{key}.retry_after: must be at least 1")
        if self.retry_after_max < self.retry_after:
            raise ConfigError(f"{key}.retry_after_max: must be at least retry_after")


@dataclass(frozen=True)
class LimitsConfig:
    """Request limits checked before anything reaches a neuron."""

    # Largest max_tokens (or max_completion_tokens) accepted; larger is a 400.
    max_tokens: int = 32768
    # Largest request body in bytes.
    max_body: int = field(default=8 << 20, metadata={"unit": "bytes"})
    # API requests this cortex serves at once; more are a 503 with Retry-After.
    max_concurrent: int = 1024
    # Connections one client address may hold; a new one past it is a 429, then closed.
    max_connections_per_address: int = 256

    def check_config(self, key: str) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"{key}.max_tokens: must be at least 1")
        if self.max_concurrent < 1:
            raise ConfigError(f"{key}.max_concurrent: must be at least 1")
        if self.max_connections_per_address < 1:
            raise ConfigError(f"{key}.max_connections_per_address: must be at least 1")
        if not 1024 <= self.max_body <= MESSAGE_BYTES:
            raise ConfigError(
                f"{key}.max_body: must be between 1KiB and 16MiB (a request must fit one "
                "message to a neuron)"
            )


@dataclass(frozen=True)
class ResponsesConfig:
    """The answers ``/v1/responses`` keeps for ``previous_response_id`` and retrieval."""

    # At most this many kept; the oldest go first. 0 keeps none.
    max_stored: int = 1000
    # Seconds one is kept.
    max_age: float = 3600.0
    # Most bytes they take together (input and output items as JSON).
    max_bytes: int = field(default=256 << 20, metadata={"unit": "bytes"})

    def check_config(self, key: str) -> None:
        if self.max_stored < 0:
            raise ConfigError(f"{key}.max_stored: must not be negative (0 keeps none)")
        _check_positive(self.max_age, f"{key}.max_age")
        if self.max_bytes < 1024:
            raise ConfigError(f"{key}.max_bytes: must be at least 1KiB")


@dataclass(frozen=True)
class RoutingConfig:
    """How a request for a model several neurons hold picks one (``cortex.affinity``)."""

    # "cache_aware": the neuron that last served the longest beginning of the prompt, unless
    # it is too busy; "least_loaded": always the neuron with the fewest requests for the model.
    policy: str = "cache_aware"
    # Requests for the model the cache's neuron may have beyond the least loaded one's.
    balance_margin: int = 4
    # Prompt beginnings remembered (about 100 bytes each); the least recently used go first.
    prefix_entries: int = 200_000
    # A stream whose neuron fails mid-way goes on on another neuron (``cortex.resume``).
    resume_streams: bool = True

    @property
    def cache_aware(self) -> bool:
        return self.policy == "cache_aware"

    def check_config(self, key: str) -> None:
        if self.policy not in ("cache_aware", "least_loaded"):
            raise ConfigError(f"{key}.policy: must be cache_aware or least_loaded")
        if self.balance_margin < 0:
            raise ConfigError(f"{key}.balance_margin: must not be negative")
        if self.prefix_entries < 1:
            raise ConfigError(f"{key}.prefix_entries: must be at least 1")


@dataclass(frozen=True)
class AuthConfig:
    """Who may call the API (/v1): keys given inline and/or in a keys file, and per-key limits.

    With no key configured, cortex listens on loopback only unless ``allow_unauthenticated``.
    """

    keys: list[str] = field(default_factory=list)
    # One key per line; blank lines and '#' comments skipped. Re-read on SIGHUP.
    keys_file: str = ""
    allow_unauthenticated: bool = False
    # Per key: requests running at once, and requests admitted in any 60 s; 0 means no limit.
    max_concurrent: int = 0
    requests_per_minute: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.keys or self.keys_file)

    def check_config(self, key: str) -> None:
        for i, k in enumerate(self.keys):  # "KEY" or "KEY MODEL...": the models it may use
            check_secret(k.split()[0] if k.strip() else "", f"{key}.keys[{i}]")
        for name in ("max_concurrent", "requests_per_minute"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: must not be negative (0 means no limit)")


@dataclass(frozen=True)
class AdminConfig:
    """Who may call the admin API (/admin/v1): named keys, apart from the API keys.

    Each key is a line ``NAME KEY`` (inline or in ``keys_file``, re-read on SIGHUP); the name
    is what the log shows for each action, never the key. With none, the admin API refuses all.
    """

    keys: list[str] = field(default_factory=list)
    keys_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.keys or self.keys_file)

    def check_config(self, key: str) -> None:
        for i, line in enumerate(self.keys):
            parse_admin_key(line, f"{key}.keys[{i}]")


def parse_admin_key(line: str, where: str) -> tuple[str, str]:
    """``NAME KEY``: the name the log shows and the key; ``ConfigError`` naming ``where``."""
    name, _, key = line.strip().partition(" ")
    key = key.strip()
    if not _NAME.match(name) or not key:
        raise ConfigError(
            f"{where}: must be 'NAME KEY', the name of letters, digits, '.', '_' and '-'"
        )
    check_secret(key, where)
    return name, key


@dataclass(frozen=True)
class CortexConfig:
    """Everything ``cortex serve`` reads from ``cortex.toml``."""

    listen: str = "0.0.0.0:31313"
    metrics_listen: str = "0.0.0.0:31314"
    # The catalogue; a relative path is relative to this file's directory.
    models_file: str = "models.toml"
    log_level: str = "info"
    neurons: list[NeuronEndpoint] = field(default_factory=list)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    responses: ResponsesConfig = field(default_factory=ResponsesConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)

    def check_config(self, key: str) -> None:
        check_address(self.listen, "listen")
        check_address(self.metrics_listen, "metrics_listen")
        check_log_level(self.log_level)
        seen: set[str] = set()
        for i, neuron in enumerate(self.neurons):
            if neuron.name in seen:
                raise ConfigError(f"neurons[{i}].name: {neuron.name!r} is listed twice")
            seen.add(neuron.name)


@dataclass(frozen=True)
class CatalogueModel(ModelSpec):
    """One model clients may ask for, and how to place it on a neuron.

    Its source and limits are a ``ModelSpec``'s fields (the keys of a neuron's
    ``[[default_models]]``, sent to a neuron on load with ``to_proto``); the rest is cortex's.
    """

    # Memory the model takes on a device, for placement.
    memory: int = field(default=0, metadata={"unit": "bytes"})
    aliases: list[str] = field(default_factory=list)
    # Neuron names that may hold it; empty means any.
    neurons: list[str] = field(default_factory=list)
    # A pinned model is never evicted to make room for another.
    pinned: bool = False

    def check_config(self, key: str) -> None:
        super().check_config(key)
        if self.memory <= 0:
            raise ConfigError(f"{key}.memory: required, the bytes the model takes (e.g. '2GiB')")


@dataclass(frozen=True)
class Catalogue:
    """``models.toml``: every model cortex may place."""

    models: list[CatalogueModel] = field(default_factory=list)

    def check_config(self, key: str) -> None:
        names: set[str] = set()
        for i, model in enumerate(self.models):
            for j, name in enumerate([model.id, *model.aliases]):
                where = f"models[{i}].id" if j == 0 else f"models[{i}].aliases[{j - 1}]"
                if name in names:
                    raise ConfigError(f"{where}: {name!r} names two models")
                names.add(name)

    def find(self, name: str) -> CatalogueModel | None:
        """The model called ``name`` by its id or one of its aliases."""
        for model in self.models:
            if name == model.id or name in model.aliases:
                return model
        return None


def load(path: Path = DEFAULT_PATH) -> tuple[CortexConfig, Catalogue]:
    """Read and check ``cortex.toml`` and the catalogue it names; ``ConfigError`` names the key."""
    config = load_config(path)
    return config, load_catalogue_of(config, path)


def load_catalogue_of(config: CortexConfig, path: Path) -> Catalogue:
    """Read and check the catalogue ``config`` (read from ``path``) names, against its neurons."""
    catalogue = load_catalogue(models_path(config, path))
    known = {n.name for n in config.neurons}
    for i, model in enumerate(catalogue.models):
        for j, name in enumerate(model.neurons):
            if name not in known:
                raise ConfigError(
                    f"{models_path(config, path)}: models[{i}].neurons[{j}]: {name!r} is not a "
                    f"neuron in {path}"
                )
    return catalogue


def models_path(config: CortexConfig, config_path: Path) -> Path:
    path = Path(config.models_file)
    return path if path.is_absolute() else config_path.parent / path


def load_config(path: Path) -> CortexConfig:
    """Read and check ``cortex.toml`` alone (not the catalogue it names)."""
    return load_file(CortexConfig, path)


def load_catalogue(path: Path) -> Catalogue:
    """Read and check a ``models.toml``."""
    return load_file(Catalogue, path)
