"""How cortex dials a neuron: its token and TLS files read once, and the channel they make.

Everything that dials a neuron (the fleet, so ``cortex serve`` and ``cortex status``) opens its
channel with ``open_channel``. The token rides as ``authorization: Bearer TOKEN`` metadata on
every call, added by a client interceptor only when a token is set; TLS uses the CA (and, for
mTLS, the client certificate) from the config. The keepalive options are the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from cortex.config import CortexConfig, NeuronLink
from helexa.secretfiles import read_bytes, read_token


@dataclass(frozen=True)
class Link:
    """A neuron's token and TLS material, read from the files the config names."""

    token: str = ""
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str = ""

    @property
    def tls(self) -> bool:
        return self.ca is not None


def read_links(config: CortexConfig) -> dict[str, Link]:
    """Each neuron's ``Link`` by name; ``ConfigError`` naming the key of a bad file."""
    fleet_token = read_token(config.fleet.token, config.fleet.token_file, "fleet")
    fleet_tls = _read_tls(config.fleet, "fleet")
    links = {}
    for i, neuron in enumerate(config.neurons):
        key = f"neurons[{i}]"
        token = read_token(neuron.token, neuron.token_file, key) if neuron.sets_token else None
        tls = _read_tls(neuron, key) if neuron.sets_tls else fleet_tls
        links[neuron.name] = Link(fleet_token if token is None else token, *tls)
    return links


def _read_tls(link: NeuronLink, key: str) -> tuple[bytes | None, bytes | None, bytes | None, str]:
    def read(path: str, name: str) -> bytes | None:
        return read_bytes(path, f"{key}.{name}") if path else None

    return (
        read(link.ca_file, "ca_file"),
        read(link.cert_file, "cert_file"),
        read(link.key_file, "key_file"),
        link.server_name,
    )


class _Token:
    """Adds ``authorization: Bearer TOKEN`` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._metadata)
        return details._replace(metadata=metadata)  # type: ignore[attr-defined,no-any-return]


# grpc.aio files an interceptor under the first call kind it is an instance of: one per kind.
class _UnaryToken(_Token, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamToken(_Token, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _ManyToken(_Token, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


def open_channel(endpoint: str, link: Link, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    """A channel to ``endpoint`` (exactly as configured) with ``link``'s token and TLS."""
    interceptors: list[grpc.aio.ClientInterceptor] | None = None
    if link.token:
        interceptors = [_UnaryToken(link.token), _StreamToken(link.token), _ManyToken(link.token)]
    if not link.tls:
        return grpc.aio.insecure_channel(endpoint, options=options, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=link.ca, private_key=link.key, certificate_chain=link.cert
    )
    if link.server_name:
        options = [*options, ("grpc.ssl_target_name_override", link.server_name)]
    return grpc.aio.secure_channel(
        endpoint, credentials, options=options, interceptors=interceptors
    )
