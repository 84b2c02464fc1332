"""The failures cortex reports to API clients, each one a thing they can act on.

They are turned into HTTP statuses and each API's error envelope (OpenAI's, Anthropic's) in
exactly one place: ``cortex.api.errors``.
"""

from __future__ import annotations


class CortexError(Exception):
    """Base of every failure reported to a client with a message."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(CortexError):
    """A malformed body or a wrong field; ``param`` names the field."""


class BodyTooLarge(CortexError):
    """A request body above ``[limits] max_body``."""


class BodyTimeout(CortexError):
    """The request's body did not arrive within ``timeouts.body``."""


class Unauthorized(CortexError):
    """A missing or unknown API key."""


class Forbidden(CortexError):
    """Not permitted: a neuron refuses to load the model's source (its ``[loading]`` policy)."""


class NotAdmin(CortexError):
    """A request to the admin API (/admin/v1) without an admin key: a user key, or no admin key
    configured at all."""


class RateLimited(CortexError):
    """An API key is over one of its limits; ``retry_after`` says when to come back (seconds)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelNotFound(CortexError):
    """No model of that name is in the catalogue or loaded on a healthy neuron."""


class NeuronNotFound(CortexError):
    """No neuron of that name is configured (the admin API names neurons)."""


class DoesNotFit(CortexError):
    """An admin action that cannot be done as asked (a model with no room on the neuron, one
    the catalogue keeps off it, a neuron down); the message says why, and nothing was done."""


class CatalogueInvalid(CortexError):
    """An edited ``models.toml`` that cannot be used; the catalogue in use stays."""


class ResponseNotFound(CortexError):
    """No kept response has that id (never made, not stored, expired or deleted)."""


class NoCapacity(CortexError):
    """No healthy neuron can serve the model now (all down, draining, full); retry later.

    ``retry_after``: the seconds to tell the client, when measured (else the configured ones).
    """

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoRoom(NoCapacity):
    """A neuron refused to load a model for want of room (RESOURCE_EXHAUSTED): no capacity for a
    request placing it, a model that does not fit for an admin's load."""


class ShuttingDown(CortexError):
    """cortex is draining and takes no new requests."""


class NeuronFailed(CortexError):
    """A neuron failed the request (and no other could take it before the first token)."""


class StreamStalled(CortexError):
    """No token arrived within the stall timeout."""
