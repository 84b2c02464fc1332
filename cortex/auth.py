"""Who may call cortex's API: API keys (inline and a keys file re-read on SIGHUP) and per-key
limits; admin keys (the same, apart) for the admin API.

Keys are held only as SHA-256 digests and compared in constant time against every key (no early
exit); a key's text is never logged, put in a metric or an error message. A request to /v1
names its key in ``Authorization: Bearer KEY`` or ``x-api-key: KEY``. A key may name the models it
may use (``KEY MODEL...``, in the config or the file): others are as if they did not exist to
it (404), so it can make the fleet load none of them. A missing or unknown key is
a 401, a key over ``max_concurrent`` or ``requests_per_minute`` a 429 with ``Retry-After``. A
request holds its concurrency slot until its handler ends: a stream's last byte, or the client
going away (which cancels the handler). /health and /ready are never checked: they are probes.
/admin requests need an admin key (``[admin]``, each named ``NAME KEY``): an API key there is a
403, no key or an unknown one a 401.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

from aiohttp import web

from cortex import metrics
from cortex.config import AdminConfig, AuthConfig, CortexConfig, parse_admin_key
from cortex.errors import NotAdmin, RateLimited, Unauthorized
from cortex.router import KEY_MODELS
from helexa.configfile import ConfigError, is_loopback
from helexa.secretfiles import check_secret, read_lines

log = logging.getLogger(__name__)

WINDOW = 60.0  # seconds of requests_per_minute
V = TypeVar("V")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class _KeyUse:
    """One key's requests running now and admitted within the last minute."""

    active: int = 0
    admitted: deque[float] = field(default_factory=deque)


class KeySet(Generic[V]):
    """Keys given inline and in a keys file (re-read on SIGHUP), each held as its digest with
    what the key carries (``V``), and found in a request in constant time."""

    section: ClassVar[str]  # the config table: names the keys in errors
    what: ClassVar[str]  # what the log calls them

    def __init__(self, keys: list[str], keys_file: str) -> None:
        self._lines = keys
        self._file = keys_file
        self._digests: list[bytes] = []
        self._values: dict[bytes, V] = {}
        self._reloads: set[asyncio.Task[None]] = set()

    @property
    def count(self) -> int:
        return len(self._digests)

    def _parse(self, line: str, where: str) -> tuple[str, V]:
        """A line's key and what it carries; ``ConfigError`` naming ``where``."""
        raise NotImplementedError

    def load(self) -> int:
        """Read the keys (the file too); ``ConfigError`` naming the key if the file is bad."""
        self._use_keys(self._read())
        return self.count

    def _read(self) -> dict[bytes, V]:
        lines = [(line, f"{self.section}.keys[{i}]") for i, line in enumerate(self._lines)]
        if self._file:
            from_file = read_lines(self._file, f"{self.section}.keys_file")
            if not from_file:
                raise ConfigError(f"{self.section}.keys_file: {self._file} holds no key")
            lines += [
                (line, f"{self.section}.keys_file (key {i + 1} of the file)")
                for i, line in enumerate(from_file)
            ]
        keys: dict[bytes, V] = {}
        for line, where in lines:
            key, value = self._parse(line, where)
            keys.setdefault(_digest(key), value)
        return keys

    def _use_keys(self, keys: dict[bytes, V]) -> None:
        self._digests = list(keys)
        self._values = keys

    def reload_soon(self) -> None:
        """SIGHUP: re-read the keys file off the loop; a bad file keeps the keys in use."""
        task = asyncio.create_task(self._reload(), name=f"{self.section}-keys-reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self) -> None:
        if not self._file:
            log.info("SIGHUP: no %s.keys_file to reload keys=%d", self.section, self.count)
            return
        try:
            keys = await asyncio.to_thread(self._read)
        except ConfigError as e:
            log.error("%s not reloaded, keeping keys=%d error=%s", self.what, self.count, e)
            return
        self._use_keys(keys)
        log.info("%s reloaded keys=%d keys_file=%s", self.what, len(keys), self._file)

    def find(self, request: web.Request) -> bytes:
        """The digest of the request's key if it is one of these, else ``b""``."""
        offered = [request.headers.get("x-api-key", "")]
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            offered.append(token.strip())
        found = b""
        for key in offered:
            if not key:
                continue
            digest = _digest(key)
            for known in self._digests:  # every key, no early exit
                if hmac.compare_digest(known, digest):
                    found = known
        return found


class KeyRing(KeySet[frozenset[str] | None]):
    """The API keys cortex accepts now, and each key's use against its limits."""

    section, what = "auth", "api keys"

    def __init__(self, config: AuthConfig) -> None:
        super().__init__(config.keys, config.keys_file)
        self.config = config
        self._use: dict[bytes, _KeyUse] = {}

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def _parse(self, line: str, where: str) -> tuple[str, frozenset[str] | None]:
        return parse_key(line, where)

    def _use_keys(self, keys: dict[bytes, frozenset[str] | None]) -> None:
        # Keys that stay keep their counts; a removed key's in-flight requests still finish.
        self._use = {d: self._use.get(d, _KeyUse()) for d in keys}
        super()._use_keys(keys)

    def models_of(self, digest: bytes) -> frozenset[str] | None:
        """The models the key may use; None: any."""
        return self._values.get(digest)

    def identify(self, request: web.Request) -> bytes:
        """The digest of the request's key; ``Unauthorized`` if it has none we accept."""
        found = self.find(request)
        if not found:
            metrics.REJECTIONS.labels(reason="invalid_api_key").inc()
            raise Unauthorized(
                "Missing or unknown API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
            )
        return found

    @asynccontextmanager
    async def admit(self, digest: bytes) -> AsyncIterator[None]:
        """Hold one of the key's slots while the request runs; ``RateLimited`` when over."""
        use = self._use.get(digest) or _KeyUse()
        now = time.monotonic()
        while use.admitted and use.admitted[0] <= now - WINDOW:
            use.admitted.popleft()
        limit = self.config.max_concurrent
        if limit and use.active >= limit:
            metrics.REJECTIONS.labels(reason="key_concurrency").inc()
            raise RateLimited(
                f"Too many requests at once for this API key (max_concurrent={limit})",
                retry_after=1,
            )
        rate = self.config.requests_per_minute
        if rate and len(use.admitted) >= rate:
            metrics.REJECTIONS.labels(reason="key_rate_limit").inc()
            # The oldest admitted request leaves the window then, freeing a slot.
            wait = max(1, math.ceil(use.admitted[0] + WINDOW - now))
            raise RateLimited(
                f"Rate limit reached for this API key (requests_per_minute={rate})",
                retry_after=wait,
            )
        use.admitted.append(now)
        use.active += 1
        try:
            yield
        finally:
            use.active -= 1


def parse_key(line: str, where: str) -> tuple[str, frozenset[str] | None]:
    """A key, then (optionally, after whitespace) the models it may use: ``KEY [MODEL...]``."""
    key, *models = line.split()
    check_secret(key, where)
    return key, frozenset(models) if models else None


class AdminKeys(KeySet[str]):
    """The admin keys (``[admin]``), each with the name the log shows for what it does."""

    section, what = "admin", "admin keys"

    def __init__(self, config: AdminConfig) -> None:
        super().__init__(config.keys, config.keys_file)
        self.config = config

    def _parse(self, line: str, where: str) -> tuple[str, str]:
        name, key = parse_admin_key(line, where)
        return key, name

    def name_of(self, request: web.Request, users: KeyRing) -> str:
        """The name of the request's admin key: ``NotAdmin`` (403) for an API key or when no
        admin key is configured, ``Unauthorized`` (401) for no key or an unknown one."""
        if not self.config.enabled:
            metrics.REJECTIONS.labels(reason="admin_key").inc()
            raise NotAdmin("the admin API is off: no admin key is configured ([admin] keys)")
        found = self.find(request)
        if found:
            return self._values[found]
        metrics.REJECTIONS.labels(reason="admin_key").inc()
        if users.find(request):
            raise NotAdmin("an API key may not use the admin API: send an admin key")
        raise Unauthorized(
            "Missing or unknown admin key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
        )


KEYRING = web.AppKey("keyring", KeyRing)
ADMIN_KEYS = web.AppKey("admin_keys", AdminKeys)
# The name of the request's admin key, on /admin requests.
ADMIN = "admin_name"
# The digest of the request's API key (absent when no keys are configured).
KEY = "api_key_digest"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def require_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Inside the error middleware: its refusals become OpenAI envelopes there. The key's
    digest is the request's ``KEY`` (what it owns, such as kept responses, is the key's); an
    admin key's name is an /admin request's ``ADMIN``."""
    keyring = request.app[KEYRING]
    if request.path.startswith("/admin/"):
        request[ADMIN] = request.app[ADMIN_KEYS].name_of(request, keyring)
        return await handler(request)
    if not keyring.enabled or not request.path.startswith("/v1/"):
        return await handler(request)
    digest = request[KEY] = keyring.identify(request)
    KEY_MODELS.set(keyring.models_of(digest))  # the router serves this task only those
    async with keyring.admit(digest):
        return await handler(request)


def listen_host(config: CortexConfig) -> str:
    """The host the API binds: loopback only when no key is set, unless allowed; logged."""
    host = config.listen.rpartition(":")[0]
    auth = config.auth
    if auth.enabled:
        return host
    if is_loopback(config.listen):
        log.info("no API keys: the API takes requests without a key, from this host only")
        return host
    if auth.allow_unauthenticated:
        log.warning(
            "no API keys and auth.allow_unauthenticated = true: anyone who reaches listen=%s "
            "may use the API",
            config.listen,
        )
        return host
    log.warning(
        "no API keys ([auth] keys / keys_file): listening on 127.0.0.1 instead of listen=%s; "
        "set keys, or auth.allow_unauthenticated = true to serve without them",
        config.listen,
    )
    return "127.0.0.1"
