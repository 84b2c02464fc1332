"""neuron: the worker daemon that holds models on a host's devices and generates text."""

__version__ = "0.1.0"
