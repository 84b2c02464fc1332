"""The failures a neuron reports to its callers, each one a thing they can act on.

They are turned into gRPC statuses in exactly one place: ``neuron.server``.
"""

from __future__ import annotations


class NeuronError(Exception):
    """Base of every failure the neuron reports with a message."""


class ModelNotFound(NeuronError):
    """No model with that id is loaded (or it is unloading)."""


class InvalidArgument(NeuronError):
    """A request field is wrong; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotAllowed(NeuronError):
    """The config does not let this neuron load that source (``[loading]``)."""


class NoRoom(NeuronError):
    """No device has room for the model."""


class ShuttingDown(NeuronError):
    """The neuron is draining and accepts no new work."""


class SpecConflict(NeuronError):
    """A model with that id is held with a different spec."""


class LoadFailed(NeuronError):
    """Turning a spec into a loaded model failed (bad files, unknown repo, ...)."""


class QueueFull(NeuronError):
    """The model's queue of waiting requests is at its bound."""


class QueueTimeout(NeuronError):
    """A request waited for a batch slot longer than its ``queue_timeout`` and was dropped."""


class GenerationFailed(NeuronError):
    """The engine failed while generating (a bug or a device fault); the message says how."""
