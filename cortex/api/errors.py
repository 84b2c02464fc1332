"""The one place cortex's failures become HTTP statuses and OpenAI's error envelope."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cortex.errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    CortexError,
    Forbidden,
    ModelNotFound,
    NeuronFailed,
    NoCapacity,
    RateLimited,
    ResponseNotFound,
    ShuttingDown,
    StreamStalled,
    Unauthorized,
)

# (HTTP status, OpenAI error type, code)
_STATUS: dict[type[CortexError], tuple[int, str, str | None]] = {
    BadRequest: (400, "invalid_request_error", None),
    Unauthorized: (401, "invalid_request_error", "invalid_api_key"),
    Forbidden: (403, "permission_error", "model_not_permitted"),
    RateLimited: (429, "requests", "rate_limit_exceeded"),
    BodyTooLarge: (413, "invalid_request_error", "request_too_large"),
    BodyTimeout: (408, "invalid_request_error", "request_timeout"),
    ModelNotFound: (404, "invalid_request_error", "model_not_found"),
    ResponseNotFound: (404, "invalid_request_error", "response_not_found"),
    NeuronFailed: (502, "api_error", "neuron_failed"),
    NoCapacity: (503, "server_error", "no_capacity"),
    ShuttingDown: (503, "server_error", "shutting_down"),
    StreamStalled: (504, "server_error", "stream_stalled"),
}
# Statuses that tell the client to come back later.
_RETRY_LATER = (NoCapacity, ShuttingDown)


# Characters of an error message a client gets back: messages quote what the client sent.
MESSAGE_CHARS = 1000


def envelope(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    if len(message) > MESSAGE_CHARS:
        message = f"{message[:MESSAGE_CHARS]}...({len(message) - MESSAGE_CHARS} more)"
    if param is not None and len(param) > MESSAGE_CHARS:
        param = param[:MESSAGE_CHARS]
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_of(error: CortexError) -> int:
    return _STATUS.get(type(error), (500, "", None))[0]


def error_body(error: CortexError) -> dict[str, Any]:
    """OpenAI's envelope for ``error`` (also what an SSE error event carries)."""
    _, type_, code = _STATUS.get(type(error), (500, "server_error", None))
    return envelope(error.message, type_, error.param, code)


def error_response(error: CortexError, retry_after: int) -> web.Response:
    if isinstance(error, NoCapacity) and error.retry_after is not None:
        retry_after = error.retry_after
    headers = {"Retry-After": str(retry_after)} if isinstance(error, _RETRY_LATER) else None
    if isinstance(error, RateLimited):
        headers = {"Retry-After": str(error.retry_after)}
    return web.json_response(error_body(error), status=status_of(error), headers=headers)


def http_error_response(error: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no such route, wrong method, body too large) as envelopes."""
    type_ = "invalid_request_error" if error.status < 500 else "server_error"
    message = error.reason
    if error.status == 404:
        message = "Not found: no such route"
    response = web.json_response(envelope(message, type_, None, None), status=error.status)
    if error.status == 405 and "Allow" in error.headers:
        response.headers["Allow"] = error.headers["Allow"]
    return response


def internal_error_response() -> web.Response:
    return web.json_response(
        envelope("internal error in cortex; see its log", "server_error"), status=500
    )
