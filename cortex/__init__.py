"""cortex: the gateway that serves an OpenAI-compatible API over a fleet of neurons."""

__version__ = "0.1.0"
