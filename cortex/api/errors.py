"""The one place cortex's failures become HTTP statuses and error envelopes: OpenAI's
(``{"error": {"message", "type", "param", "code"}}``) on its routes, Anthropic's
(``{"type": "error", "error": {"type", "message"}}``) on ``/v1/messages``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cortex.errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    CatalogueInvalid,
    CortexError,
    DoesNotFit,
    Forbidden,
    ModelNotFound,
    NeuronFailed,
    NeuronNotFound,
    NoCapacity,
    NoRoom,
    NotAdmin,
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
    NotAdmin: (403, "permission_error", "admin_key_required"),
    ModelNotFound: (404, "invalid_request_error", "model_not_found"),
    NeuronNotFound: (404, "invalid_request_error", "neuron_not_found"),
    DoesNotFit: (409, "invalid_request_error", "conflict"),
    CatalogueInvalid: (422, "invalid_request_error", "catalogue_invalid"),
    ResponseNotFound: (404, "invalid_request_error", "response_not_found"),
    NeuronFailed: (502, "api_error", "neuron_failed"),
    NoCapacity: (503, "server_error", "no_capacity"),
    NoRoom: (503, "server_error", "no_capacity"),
    ShuttingDown: (503, "server_error", "shutting_down"),
    StreamStalled: (504, "server_error", "stream_stalled"),
}
# Statuses that tell the client to come back later.
_RETRY_LATER = (NoCapacity, ShuttingDown)


# Characters of an error message a client gets back: messages quote what the client sent.
MESSAGE_CHARS = 1000


def _cut(message: str) -> str:
    if len(message) > MESSAGE_CHARS:
        return f"{message[:MESSAGE_CHARS]}...({len(message) - MESSAGE_CHARS} more)"
    return message


def envelope(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    if param is not None and len(param) > MESSAGE_CHARS:
        param = param[:MESSAGE_CHARS]
    return {"error": {"message": _cut(message), "type": type_, "param": param, "code": code}}


def status_of(error: CortexError) -> int:
    return _STATUS.get(type(error), (500, "", None))[0]


def error_body(error: CortexError) -> dict[str, Any]:
    """OpenAI's envelope for ``error`` (also what an SSE error event carries)."""
    _, type_, code = _STATUS.get(type(error), (500, "server_error", None))
    return envelope(error.message, type_, error.param, code)


def _retry_headers(error: CortexError, retry_after: int) -> dict[str, str] | None:
    """``Retry-After`` for a failure that asks the client to come back (else None)."""
    if isinstance(error, NoCapacity) and error.retry_after is not None:
        retry_after = error.retry_after
    if isinstance(error, RateLimited):
        retry_after = error.retry_after
    elif not isinstance(error, _RETRY_LATER):
        return None
    return {"Retry-After": str(retry_after)}


def error_response(error: CortexError, retry_after: int) -> web.Response:
    headers = _retry_headers(error, retry_after)
    return web.json_response(error_body(error), status=status_of(error), headers=headers)


def http_error_response(error: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no such route, wrong method, body too large) as envelopes."""
    type_ = "invalid_request_error" if error.status < 500 else "server_error"
    message = error.reason
    if error.status == 404:
        message = "Not found: no such route"
    return _refusal(error, envelope(message, type_, None, None))


def _refusal(error: web.HTTPException, body: dict[str, Any]) -> web.Response:
    """aiohttp's refusal ``error`` answered with ``body`` (and, for a 405, its Allow)."""
    response = web.json_response(body, status=error.status)
    if error.status == 405 and "Allow" in error.headers:
        response.headers["Allow"] = error.headers["Allow"]
    return response


def internal_error_response() -> web.Response:
    return web.json_response(
        envelope("internal error in cortex; see its log", "server_error"), status=500
    )


# ---- Anthropic's dialect ----

ANTHROPIC_ROUTES = "/v1/messages"  # and what lies under it
# (HTTP status, Anthropic error type). Anthropic has no 502 or 503: a neuron's failure is its
# api_error, no capacity, a draining cortex and limits.max_concurrent its overloaded_error (529,
# with Retry-After). It has no 408 type either: a body too slow is an invalid_request_error.
_ANTHROPIC: dict[type[CortexError], tuple[int, str]] = {
    BadRequest: (400, "invalid_request_error"),
    Unauthorized: (401, "authentication_error"),
    Forbidden: (403, "permission_error"),
    ModelNotFound: (404, "not_found_error"),
    ResponseNotFound: (404, "not_found_error"),
    BodyTimeout: (408, "invalid_request_error"),
    BodyTooLarge: (413, "request_too_large"),
    RateLimited: (429, "rate_limit_error"),
    NeuronFailed: (500, "api_error"),
    StreamStalled: (504, "timeout_error"),
    NoCapacity: (529, "overloaded_error"),
    NoRoom: (529, "overloaded_error"),
    ShuttingDown: (529, "overloaded_error"),
}


def is_anthropic(path: str) -> bool:
    """Whether ``path`` is one of Anthropic's routes, which answer in its envelope."""
    return path == ANTHROPIC_ROUTES or path.startswith(ANTHROPIC_ROUTES + "/")


def anthropic_envelope(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": _cut(message)}}


def anthropic_error_body(error: CortexError) -> dict[str, Any]:
    """Anthropic's envelope for ``error`` (also what its SSE ``error`` event carries)."""
    _, type_ = _ANTHROPIC.get(type(error), (500, "api_error"))
    return anthropic_envelope(type_, error.message)


def anthropic_error_response(error: CortexError, retry_after: int) -> web.Response:
    status = _ANTHROPIC.get(type(error), (500, ""))[0]
    headers = _retry_headers(error, retry_after)
    return web.json_response(anthropic_error_body(error), status=status, headers=headers)


def anthropic_http_error_response(error: web.HTTPException) -> web.Response:
    """aiohttp's own refusals in Anthropic's envelope."""
    type_ = {404: "not_found_error", 413: "request_too_large"}.get(
        error.status, "invalid_request_error" if error.status < 500 else "api_error"
    )
    message = "Not found: no such route" if error.status == 404 else error.reason
    return _refusal(error, anthropic_envelope(type_, message))


def anthropic_internal_error_response() -> web.Response:
    return web.json_response(
        anthropic_envelope("api_error", "internal error in cortex; see its log"), status=500
    )
