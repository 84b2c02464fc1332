"""Who may call the neuron: a shared token in gRPC metadata, and TLS (or mTLS) on its port.

With ``[auth] token`` (or ``token_file``) every call must carry ``authorization: Bearer TOKEN``,
else it ends with UNAUTHENTICATED before reaching the servicer. ``grpc.health.v1`` is exempt:
probes (load balancers, ``grpc_health_probe``, orchestrators) ask it without credentials, and
it tells only SERVING or NOT_SERVING. The token is compared in constant time and never logged.
With ``[tls]`` the port speaks TLS only; with ``tls.client_ca_file`` the handshake also
requires a client certificate signed by that CA (mTLS), which covers health too. A neuron
that would listen beyond loopback with neither refuses to start, unless
``auth.allow_unauthenticated``: whoever reaches its port could load models and run them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from helexa.configfile import ConfigError, is_loopback
from helexa.secretfiles import read_bytes, read_token
from neuron.config import NeuronConfig

HEALTH_SERVICE = "/grpc.health.v1.Health/"


@dataclass(frozen=True)
class Access:
    """The secrets ``serve`` needs, read from their files at start (``ConfigError`` if bad)."""

    token: str = ""
    credentials: grpc.ServerCredentials | None = None
    mtls: bool = False

    @classmethod
    def load(cls, config: NeuronConfig) -> Access:
        access = cls._read(config)
        if access.open_beyond_loopback(config.listen) and not config.auth.allow_unauthenticated:
            raise ConfigError(
                f"listen: {config.listen} is beyond loopback and no caller is asked for a token "
                "([auth] token or token_file) or a certificate (tls.client_ca_file): set one, or "
                "auth.allow_unauthenticated = true to serve without them"
            )
        return access

    @classmethod
    def _read(cls, config: NeuronConfig) -> Access:
        token = read_token(config.auth.token, config.auth.token_file, "auth")
        tls = config.tls
        if not tls.enabled:
            return cls(token)
        key = read_bytes(tls.key_file, "tls.key_file")
        cert = read_bytes(tls.cert_file, "tls.cert_file")
        client_ca = (
            read_bytes(tls.client_ca_file, "tls.client_ca_file") if tls.client_ca_file else None
        )
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        return cls(token, credentials, mtls=client_ca is not None)

    def open_beyond_loopback(self, listen: str) -> bool:
        """Whether anyone who reaches ``listen`` could call, with no token and no mTLS."""
        return not self.token and not self.mtls and not is_loopback(listen)

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenInterceptor(self.token)] if self.token else []

    def describe(self) -> str:
        """For the log line at start: what is asked of callers, never the token."""
        tls = "mtls" if self.mtls else "on" if self.credentials is not None else "off"
        return f"tls={tls} token={'required' if self.token else 'off'}"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call without the right ``authorization`` metadata with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = _digest(f"Bearer {token}")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_SERVICE):
            return handler
        offered = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(_digest(str(offered)), self._expected):
            return handler
        return _refusal(handler)


_REFUSAL = "missing or wrong token: send metadata 'authorization: Bearer TOKEN' ([auth] token)"


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)


async def _refuse_stream(
    request: Any, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[Any]:
    await _refuse(request, context)
    yield  # never reached: abort raises; this makes it the generator a streaming RPC needs


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that refuses the call."""
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    behaviour = _refuse_stream if handler.response_streaming else _refuse
    return make(
        behaviour,  # type: ignore[arg-type]
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
