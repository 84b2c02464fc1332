"""The grpc.aio servicer of ``helexa.neuron.v1.Neuron``.

It maps RPCs to the registry and the engine, converts protobuf to in-process dataclasses at
the boundary, and turns ``NeuronError`` into gRPC statuses in one place (``_CODES``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import socket
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from helexa.modelspec import ModelSpec, SpecError
from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from neuron import __version__, loadprogress
from neuron.engine import (
    CANCELLED,
    ERROR,
    LENGTH,
    STOP,
    TOOL_CALLS,
    Chunk,
    ModelEngine,
    SamplingParams,
    tools,
)
from neuron.engine.grammar import UnenforceableSchema, check_schema
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
T = TypeVar("T")

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
    TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}
_CHOICES = {
    pb.TOOL_CHOICE_MODE_AUTO: tools.AUTO,
    pb.TOOL_CHOICE_MODE_NONE: tools.NONE,
    pb.TOOL_CHOICE_MODE_REQUIRED: tools.REQUIRED,
    pb.TOOL_CHOICE_MODE_FUNCTION: tools.FUNCTION,
}
_STATES = {
    "LOADING": pb.MODEL_STATE_LOADING,
    "READY": pb.MODEL_STATE_READY,
    "UNLOADING": pb.MODEL_STATE_UNLOADING,
    "FAILED": pb.MODEL_STATE_FAILED,
}
_STAGES = {
    loadprogress.DOWNLOADING: pb.LOAD_STAGE_DOWNLOADING,
    loadprogress.MATERIALISING: pb.LOAD_STAGE_MATERIALISING,
    loadprogress.LOADING_WEIGHTS: pb.LOAD_STAGE_LOADING_WEIGHTS,
    loadprogress.WARMING_UP: pb.LOAD_STAGE_WARMING_UP,
}
_UNITS = {loadprogress.BYTES: pb.LOAD_UNIT_BYTES, loadprogress.TENSORS: pb.LOAD_UNIT_TENSORS}
_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 16
# Characters in one stop sequence: what a token's check costs grows with it.
MAX_STOP_LENGTH = 256
# Below this a temperature samples as greedy: dividing logits by it overflows to inf and NaN.
MIN_TEMPERATURE = 1e-5
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300


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

    async def CountTokens(
        self, request: pb.GenerateRequest, context: Any
    ) -> pb.CountTokensResponse:
        try:
            _, prompt_ids, _ = await self._prepared(request)
        except NeuronError as e:
            await _abort(context, e)
        return pb.CountTokensResponse(input_tokens=len(prompt_ids))

    async def _prepared(
        self, request: pb.GenerateRequest
    ) -> tuple[ModelEngine, list[int], SamplingParams]:
        """The engine for ``request`` and its prompt and parameters, as Generate runs them."""
        if self.draining:
            raise ShuttingDown("the neuron is shutting down and takes no new requests")
        engine = await self.registry.engine_for(_required_model(request))
        prompt_ids, params = await prepare(engine, request)
        return engine, prompt_ids, params

    async def _generation(
        self, request: pb.GenerateRequest
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """One generation, as Generate streams it and GenerateMany multiplexes it."""
        self.active_generations += 1
        self._drained.clear()
        try:
            engine, prompt_ids, params = await self._prepared(request)
            request_id = request.request_id or uuid.uuid4().hex
            queue_timeout = _seconds(request, "queue_timeout", "no bound")
            interval = _seconds(request, "message_interval", "a stream")
            # The engine refuses (queue full, queue timeout, model going away) before any chunk.
            chunks = engine.stream(prompt_ids, params, request_id, queue_timeout, interval)
            first = True
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    if chunk.finish_reason == ERROR:
                        raise GenerationFailed(chunk.error)
                    response = _response(chunk)
                    if first:  # the prompt's usage, for APIs that announce it first
                        response.usage.prompt_tokens = chunk.prompt_tokens
                        response.usage.cached_prompt_tokens = chunk.cached_tokens
                        first = False
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
            kv_cache_bytes=held.kv_bytes,
            loaded_at=held.loaded_at,
            last_used=held.last_used,
            in_flight=len(engine.running) if engine else 0,
            waiting=len(engine.waiting) if engine else 0,
            max_context=engine.max_context if engine else 0,
            spec=held.spec.to_proto(),
            max_batch_size=engine.max_batch_size if engine else 0,
            max_waiting=engine.max_waiting if engine else 0,
            load=_load_progress(held.progress.snapshot()) if held.state == "LOADING" else None,
        )


def _load_progress(now: loadprogress.Snapshot) -> pb.LoadProgress:
    return pb.LoadProgress(
        stage=_STAGES.get(now.stage, pb.LOAD_STAGE_UNSPECIFIED),
        unit=_UNITS.get(now.unit, pb.LOAD_UNIT_UNSPECIFIED),
        done=now.done,
        total=now.total,
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


async def prepare(
    engine: ModelEngine, request: pb.GenerateRequest
) -> tuple[list[int], SamplingParams]:
    """Validate a Generate request, tokenise its input and compile its constraint (both off
    the event loop)."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input", "give chat messages or a prompt")
    offered = _tools(request)
    choice, function = _tool_choice(request, offered)
    if kind == "chat":
        messages = _messages(request)
        shown = offered if choice != tools.NONE else []
        try:
            prompt_ids = await _preparing(engine.encode_chat, messages, shown)
        except InvalidArgument:
            raise
        except Exception as e:  # a template that rejects the conversation
            raise InvalidArgument("chat.messages", f"cannot apply the chat template: {e}") from e
    else:
        if offered:
            raise InvalidArgument("tools", "tools need chat messages, not a prompt")
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        prompt_ids = await _preparing(engine.encode_prompt, request.prompt)
    if not prompt_ids:
        raise InvalidArgument(kind, "encodes to no tokens")
    continued: list[int] = []
    if request.continuation:
        # The grammar and the call reader would need the answer so far replayed through them.
        if (offered and choice != tools.NONE) or request.output.WhichOneof("kind"):
            raise InvalidArgument(
                "continuation", "cannot continue an answer held to tools or an output constraint"
            )
        continued = await _preparing(engine.encode_continuation, request.continuation)
        prompt_ids = prompt_ids + continued
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
        if request.max_tokens > max_tokens and not continued:
            raise InvalidArgument(
                "max_tokens",
                f"the prompt is {len(prompt_ids)} tokens and max_tokens is {request.max_tokens}: "
                f"together more than the model's context of {engine.max_context} tokens",
            )
        # A continuation's text may take a token or two more than when it was generated.
        max_tokens = min(request.max_tokens, max_tokens)
    elif request.max_tokens_limit:
        max_tokens = min(max_tokens, request.max_tokens_limit)
    if request.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument("top_logprobs", f"must be 0 to {MAX_TOP_LOGPROBS}")
    if request.top_logprobs and not request.logprobs:
        raise InvalidArgument("top_logprobs", "needs logprobs")
    constraint, grammar = await _constraint(engine, request, offered, choice, function)
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
        presence_penalty=_number(request, "presence_penalty", 0.0, low=-2.0, high=2.0),
        frequency_penalty=_number(request, "frequency_penalty", 0.0, low=-2.0, high=2.0),
        logit_bias=_logit_bias(request, engine.vocab_size),
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        grammar=grammar,
        constraint=constraint,
        tool_calls=bool(offered) and choice != tools.NONE,
        continued=tuple(continued),
    )
    return prompt_ids, params


# Tokenising and compiling grammars have threads of their own: a request never waits behind
# a model load, which holds a thread of the default pool for seconds.
_PREPARING = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare")


async def _preparing(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the preparing threads."""
    return await asyncio.get_running_loop().run_in_executor(_PREPARING, fn, *args)


def _messages(request: pb.GenerateRequest) -> list[dict[str, Any]]:
    if not request.chat.messages:
        raise InvalidArgument("chat.messages", "must not be empty")
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(request.chat.messages):
        key = f"chat.messages[{i}]"
        if m.role not in _ROLES:
            raise InvalidArgument(f"{key}.role", f"must be one of {', '.join(_ROLES)}")
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidArgument(f"{key}.tool_calls", "only an assistant makes tool calls")
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.arguments)
                except ValueError as e:
                    raise InvalidArgument(
                        f"{key}.tool_calls[{j}].arguments", f"is not JSON: {e}"
                    ) from None
                if not isinstance(arguments, dict):
                    raise InvalidArgument(f"{key}.tool_calls[{j}].arguments", "must be an object")
                if not call.name:
                    raise InvalidArgument(f"{key}.tool_calls[{j}].name", "must not be empty")
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        # Templates that take tools want the arguments as an object.
                        "function": {"name": call.name, "arguments": arguments},
                    }
                )
            message["tool_calls"] = calls
        if m.role == "tool":
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    return messages


def _tools(request: pb.GenerateRequest) -> list[tools.Tool]:
    if len(request.tools) > MAX_TOOLS:
        raise InvalidArgument("tools", f"at most {MAX_TOOLS} tools")
    offered: list[tools.Tool] = []
    names: set[str] = set()
    for i, tool in enumerate(request.tools):
        if not tool.name:
            raise InvalidArgument(f"tools[{i}].name", "must not be empty")
        if tool.name in names:
            raise InvalidArgument(f"tools[{i}].name", f"{tool.name!r} is listed twice")
        names.add(tool.name)
        parameters = _schema(tool.parameters, f"tools[{i}].parameters") if tool.parameters else {}
        parameters = parameters or {"type": "object"}
        offered.append(tools.Tool(tool.name, tool.description, parameters))
    return offered


def _tool_choice(request: pb.GenerateRequest, offered: list[tools.Tool]) -> tuple[str, str]:
    choice = _CHOICES.get(request.tool_choice.mode)
    if choice is None:
        raise InvalidArgument("tool_choice.mode", f"unknown mode {request.tool_choice.mode}")
    function = request.tool_choice.function
    if choice in (tools.REQUIRED, tools.FUNCTION) and not offered:
        raise InvalidArgument("tool_choice", f"{choice} needs tools")
    if choice == tools.FUNCTION and function not in {t.name for t in offered}:
        raise InvalidArgument("tool_choice.function", f"{function!r} is not one of the tools")
    return choice, function


def _schema(text: str, field: str) -> dict[str, Any]:
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(field, f"is not JSON: {e}") from None
    try:
        check_schema(schema)
    except UnenforceableSchema as e:
        raise InvalidArgument(field, str(e)) from None
    return schema if isinstance(schema, dict) else {}


async def _constraint(
    engine: ModelEngine,
    request: pb.GenerateRequest,
    offered: list[tools.Tool],
    choice: str,
    function: str,
) -> tuple[str, Any]:
    """The kind of constraint on the answer and its compiled grammar (None: free text)."""
    output = request.output.WhichOneof("kind")
    calls = bool(offered) and choice != tools.NONE
    if output is not None and calls and choice == tools.AUTO:
        raise InvalidArgument(
            "output",
            "an output constraint with tools needs tool_choice none, required or a function",
        )
    if calls:
        kind, field = f"tools_{choice}", "tools"
        parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
        tag = tools.call_grammar(offered, choice, function, parallel)
        compile_ = lambda grammars: grammars.structural_tag(kind, tag)  # noqa: E731
    elif output == "json_object":
        kind, field = "json_object", "output.json_object"
        compile_ = lambda grammars: grammars.json_object()  # noqa: E731
    elif output == "json_schema":
        kind, field = "json_schema", "output.json_schema"
        _schema(request.output.json_schema, field)
        schema = request.output.json_schema
        compile_ = lambda grammars: grammars.json_schema(schema)  # noqa: E731
    else:
        return "", None
    try:
        grammar = await _preparing(lambda: compile_(engine.grammars()))
    except UnenforceableSchema as e:
        if calls:  # name the tool whose schema it is
            field = await _preparing(_culprit, engine, offered) or field
        raise InvalidArgument(field, f"cannot be enforced: {e}") from None
    return kind, grammar


def _culprit(engine: ModelEngine, offered: list[tools.Tool]) -> str:
    """The field of the first tool whose parameters do not compile alone ("" if none)."""
    for i, tool in enumerate(offered):
        try:
            engine.grammars().json_schema(json.dumps(tool.parameters))
        except UnenforceableSchema:
            return f"tools[{i}].parameters"
    return ""


def _logit_bias(request: pb.GenerateRequest, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if len(request.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens")
    for token, bias in request.logit_bias.items():
        if token >= vocab_size:
            raise InvalidArgument("logit_bias", f"token {token} is not below {vocab_size}")
        if not (math.isfinite(bias) and -100 <= bias <= 100):
            raise InvalidArgument("logit_bias", f"token {token}: bias must be -100 to 100")
    return tuple(sorted(request.logit_bias.items()))


def _response(chunk: Chunk) -> pb.GenerateResponse:
    response = pb.GenerateResponse(text=chunk.text, tokens=chunk.tokens)
    for call in chunk.tool_calls:
        response.tool_calls.add(
            index=call.index, id=call.id, name=call.name, arguments=call.arguments
        )
    for lp in chunk.logprobs:
        entry = response.logprobs.add(token=lp.token, logprob=lp.logprob, bytes=lp.raw)
        for token, logprob, raw in lp.top:
            entry.top.add(token=token, logprob=logprob, bytes=raw)
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH[chunk.finish_reason]
        response.stop_sequence = chunk.stop_sequence
        response.usage.prompt_tokens = chunk.prompt_tokens
        response.usage.completion_tokens = chunk.completion_tokens
        response.usage.cached_prompt_tokens = chunk.cached_tokens
    return response


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
        if len(stop) > MAX_STOP_LENGTH:
            raise InvalidArgument(
                f"stop[{i}]",
                f"is {len(stop)} characters; the limit is {MAX_STOP_LENGTH} (MAX_STOP_LENGTH)",
            )
    return tuple(request.stop)
