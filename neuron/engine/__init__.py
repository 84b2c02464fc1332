"""Generation for loaded models: continuous batching on one device thread per device.

Split as nano-vllm's engine is: ``sequence`` (one request's state and sampling parameters),
``scheduler`` (waiting and running, bounds, batch window: it decides, it does not run),
``runner`` (the batch's tensors, prefill and decode over the model), ``sampler`` (picking
tokens), ``output`` (detokenising, stop strings, chunks), ``draft`` (prompt-lookup drafts for
speculative decoding), ``worker`` (the device thread that owns torch) and ``model_engine``
(one model's engine: the asyncio bridge, and one ``step`` that reads schedule → run → sample
→ output).
"""

from neuron.engine import tools
from neuron.engine.model_engine import ModelEngine
from neuron.engine.output import Chunk
from neuron.engine.sequence import (
    CANCELLED,
    ERROR,
    EXPIRED,
    LENGTH,
    STOP,
    TOOL_CALLS,
    SamplingParams,
    Sequence,
)
from neuron.engine.worker import DeviceWorker

__all__ = [
    "CANCELLED",
    "ERROR",
    "EXPIRED",
    "LENGTH",
    "STOP",
    "TOOL_CALLS",
    "Chunk",
    "DeviceWorker",
    "ModelEngine",
    "SamplingParams",
    "Sequence",
    "tools",
]
