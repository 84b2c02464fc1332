"""The grpc.aio servicer of ``helexa.neuron.v1.Neuron``.

It maps RPCs to the registry and the engine, converts protobuf to in-process dataclasses at
the boundary, and turns ``NeuronError`` into gRPC statuses in one place (``_CODES``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from helexa.modelspec import ModelSpec, SpecError
from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from neuron import __version__
from neuron.engine import CANCELLED, ERROR, LENGTH, STOP, ModelEngine, SamplingParams
from neuron.errors import (
    GenerationFailed,
    InvalidArgument,
    LoadFailed,
    ModelNotFound,
    NeuronError,
    NoRoom,
    NotAllowed,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    SpecConflict,
)
from neuron.multiplex import Multiplexer
from neuron.registry import Registry

log = logging.getLogger(__name__)

_CODES: dict[type[NeuronError], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NoRoom: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QueueTimeout: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    SpecConflict: grpc.StatusCode.FAILED_PRECONDITION,
    LoadFailed: grpc.StatusCode.FAILED_PRECONDITION,
    GenerationFailed: grpc.StatusCode.INTERNAL,
}
_FINISH = {
    STOP: pb.FINISH_REASON_STOP,
    LENGTH: pb.FINISH_REASON_LENGTH,
    CANCELLED: pb.FINISH_REASON_CANCELLED,
}
_STATES = {
    "LOADING": pb.MODEL_STATE_LOADING,
    "READY": pb.MODEL_STATE_READY,
    "UNLOADING": pb.MODEL_STATE_UNLOADING,
    "FAILED": pb.MODEL_STATE_FAILED,
}
_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 16
# Below this a temperature samples as greedy: dividing logits by it overflows to inf and NaN.
MIN_TEMPERATURE = 1e-5


class NeuronService(pb_grpc.NeuronServicer):
    """Serves the neuron contract over a registry; counts generations for the drain."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.draining = False
        self.active_generations = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._many = Multiplexer(self._generation, _status)

    def begin_drain(self) -> None:
        """Refuse new work; GenerateMany calls end once their generations are done."""
        self.draining = self.registry.draining = True
        self._many.drain()

    async def wait_drained(self, within: float) -> bool:
        """Wait until no generation is running; False if ``within`` seconds pass first."""
        try:
            await asyncio.wait_for(self._drained.wait(), within)
        except TimeoutError:
            return False
        return True

    async def Info(self, request: pb.InfoRequest, context: Any) -> pb.InfoResponse:
        devices = [
            pb.Device(
                kind=pb.DEVICE_KIND_CUDA if d.kind == "cuda" else pb.DEVICE_KIND_CPU,
                index=d.index,
                name=d.name,
                description=d.description,
                total_bytes=d.total_bytes,
                free_bytes=self.registry.free_bytes(d),
            )
            for d in self.registry.devices
        ]
        return pb.InfoResponse(
            version=__version__, host=socket.gethostname(), devices=devices, draining=self.draining
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[self._status(m.spec.id) for m in self.registry.listed()]
        )

    async def LoadModel(self, request: pb.LoadModelRequest, context: Any) -> pb.LoadModelResponse:
        try:
            if self.draining:
                raise ShuttingDown("the neuron is shutting down and loads nothing new")
            try:
                spec = ModelSpec.from_proto(request.spec)
            except SpecError as e:
                raise InvalidArgument(e.field, e.message) from None
            held, already = await self.registry.load(spec)
        except NeuronError as e:
            await _abort(context, e)
        return pb.LoadModelResponse(model=self._status(held.spec.id), already_loaded=already)

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: Any
    ) -> pb.UnloadModelResponse:
        try:
            if not request.id:
                raise InvalidArgument("id", "must not be empty")
            was_loaded, freed = await self.registry.unload(request.id)
        except NeuronError as e:
            await _abort(context, e)
        return pb.UnloadModelResponse(was_loaded=was_loaded, freed_bytes=freed)

    async def Generate(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        # Headers at once: the caller knows this neuron took the call (a host that accepts
        # TCP and never answers gets no further than here, and cortex fails over).
        await context.send_initial_metadata(())
        try:
            async with contextlib.aclosing(self._generation(request)) as responses:
                async for response in responses:
                    yield response
        except NeuronError as e:
            await _abort(context, e)

    async def GenerateMany(
        self, requests: AsyncIterator[pb.GenerateManyRequest], context: Any
    ) -> AsyncIterator[pb.GenerateManyResponse]:
        async with contextlib.aclosing(self._many.serve(requests, context)) as responses:
            async for response in responses:
                yield response

    async def _generation(
        self, request: pb.GenerateRequest
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """One generation, as Generate streams it and GenerateMany multiplexes it."""
        self.active_generations += 1
        self._drained.clear()
        try:
            if self.draining:
                raise ShuttingDown("the neuron is shutting down and takes no new requests")
            engine = await self.registry.engine_for(_required_model(request))
            prompt_ids, params = await _prepare(engine, request)
            request_id = request.request_id or uuid.uuid4().hex
            queue_timeout = _seconds(request, "queue_timeout", "no bound")
            interval = _seconds(request, "message_interval", "a stream")
            # The engine refuses (queue full, queue timeout, model going away) before any chunk.
            chunks = engine.stream(prompt_ids, params, request_id, queue_timeout, interval)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    if chunk.finish_reason == ERROR:
                        raise GenerationFailed(chunk.error)
                    response = pb.GenerateResponse(text=chunk.text, tokens=chunk.tokens)
                    if chunk.finish_reason is not None:
                        response.finish_reason = _FINISH[chunk.finish_reason]
                        response.usage.prompt_tokens = chunk.prompt_tokens
                        response.usage.completion_tokens = chunk.completion_tokens
                    yield response
        finally:
            self.active_generations -= 1
            if self.active_generations == 0:
                self._drained.set()

    def _status(self, model_id: str) -> pb.ModelStatus:
        held = self.registry.models[model_id]
        engine = held.engine
        return pb.ModelStatus(
            id=model_id,
            state=_STATES[held.state],
            error=held.error,
            device=held.device,
            resident_bytes=held.resident_bytes,
            loaded_at=held.loaded_at,
            last_used=held.last_used,
            in_flight=len(engine.running) if engine else 0,
            waiting=len(engine.waiting) if engine else 0,
            max_context=engine.max_context if engine else 0,
            spec=held.spec.to_proto(),
            max_batch_size=engine.max_batch_size if engine else 0,
            max_waiting=engine.max_waiting if engine else 0,
        )


async def _abort(context: Any, error: NeuronError) -> None:
    await context.abort(*_status(error))


def _status(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a call ends with for ``error``."""
    if isinstance(error, NeuronError):
        return _CODES.get(type(error), grpc.StatusCode.INTERNAL), str(error)
    log.error("generation failed", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"the neuron failed: {type(error).__name__}: {error}"


def _required_model(request: pb.GenerateRequest) -> str:
    if not request.model:
        raise InvalidArgument("model", "must not be empty")
    return request.model


async def _prepare(
    engine: ModelEngine, request: pb.GenerateRequest
) -> tuple[list[int], SamplingParams]:
    """Validate a Generate request and tokenise its input (off the event loop)."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input", "give chat messages or a prompt")
    if kind == "chat":
        if not request.chat.messages:
            raise InvalidArgument("chat.messages", "must not be empty")
        messages = []
        for i, m in enumerate(request.chat.messages):
            if m.role not in _ROLES:
                raise InvalidArgument(
                    f"chat.messages[{i}].role", f"must be one of {', '.join(_ROLES)}"
                )
            messages.append({"role": m.role, "content": m.content})
        try:
            prompt_ids = await asyncio.to_thread(engine.encode_chat, messages)
        except Exception as e:  # a template that rejects the conversation
            raise InvalidArgument("chat.messages", f"cannot apply the chat template: {e}") from e
    else:
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        prompt_ids = await asyncio.to_thread(engine.encode_prompt, request.prompt)
    if not prompt_ids:
        raise InvalidArgument(kind, "encodes to no tokens")
    if len(prompt_ids) >= engine.max_context:
        raise InvalidArgument(
            "input",
            f"the prompt is {len(prompt_ids)} tokens; the model's context is "
            f"{engine.max_context} tokens",
        )
    # Unset, max_tokens is what the context leaves; set, prompt plus max_tokens must fit in the
    # context (as OpenAI and vLLM answer), rather than a silently shorter completion.
    max_tokens = engine.max_context - len(prompt_ids)
    if request.HasField("max_tokens"):
        if request.max_tokens < 1:
            raise InvalidArgument("max_tokens", f"must be at least 1, got {request.max_tokens}")
        if request.max_tokens > max_tokens:
            raise InvalidArgument(
                "max_tokens",
                f"the prompt is {len(prompt_ids)} tokens and max_tokens is {request.max_tokens}: "
                f"together more than the model's context of {engine.max_context} tokens",
            )
        max_tokens = request.max_tokens
    temperature = _number(request, "temperature", 1.0, low=0.0)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_p=_number(request, "top_p", 1.0, low=0.0, low_open=True, high=1.0),
        top_k=request.top_k if request.HasField("top_k") else 0,
        seed=request.seed if request.HasField("seed") else None,
        stop=_stops(request),
        # Bounded so that dividing logits by it (and then by the temperature) stays finite.
        repetition_penalty=_number(request, "repetition_penalty", 1.0, low=0.01, high=100.0),
    )
    return prompt_ids, params


def _seconds(request: pb.GenerateRequest, name: str, zero: str) -> float:
    value: float = getattr(request, name)
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgument(name, f"must be 0 ({zero}) or more seconds, got {value:g}")
    return value


def _number(
    request: pb.GenerateRequest,
    name: str,
    default: float,
    low: float,
    low_open: bool = False,
    high: float = math.inf,
) -> float:
    if not request.HasField(name):
        return default
    value = float(getattr(request, name))
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        bound = f"{'>' if low_open else '>='} {low:g}" + (
            f" and <= {high:g}" if high < math.inf else ""
        )
        raise InvalidArgument(name, f"must be {bound}, got {value:g}")
    return value


def _stops(request: pb.GenerateRequest) -> tuple[str, ...]:
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    for i, stop in enumerate(request.stop):
        if not stop:
            raise InvalidArgument(f"stop[{i}]", "must not be empty")
    return tuple(request.stop)
