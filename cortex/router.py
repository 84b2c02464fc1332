"""The router: picks the neuron for each request, places models, and retries before streaming.

Among up neurons with the model READY it takes the least loaded (in-flight and waiting as last
polled, plus cortex's own in-flight requests there), ties broken by neuron name, so a choice
never depends on dict or hash order; under ``[routing] policy = "cache_aware"`` (the default)
a generation goes instead to the neuron that last served the longest beginning of its prompt,
while that one is within ``balance_margin`` requests of the least loaded (``cortex.affinity``). When no neuron has the model, it is placed: loaded on an
allowed up neuron with room, after evicting the least recently used unpinned idle model when
none has room. Concurrent requests for a model being placed wait for that one placement. A
generation that fails before its first message is retried on another neuron (one that broke
a neuron, INTERNAL or UNKNOWN, on one other neuron only); after it, the
failure is the client's to see: ``open`` returns a ``Stream`` once the first message is there.
Generations go over each neuron's ``GenerateMany`` call (``cortex.multiplex``), and fail as
``Generate`` calls would.

A neuron must take a request (its ``accepted`` event) within ``timeouts.accept``, or the next
is tried. A request waits in neurons' queues at most ``timeouts.queue`` in all: each try
carries what is left of it, and the neuron drops the request when it runs out. A neuron whose
batch and queue for the model are known to be full (its last poll plus cortex's own requests
since) is not tried; when every one is, or all refused, the answer is 503 with a Retry-After
measured from how fast the model's queue drains (``cortex.drain``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections.abc import Callable

import grpc

from cortex import metrics
from cortex.affinity import PrefixIndex, prefix_keys
from cortex.config import Catalogue, CatalogueModel, CortexConfig
from cortex.drain import DrainRate
from cortex.errors import (
    BadRequest,
    CortexError,
    Forbidden,
    ModelNotFound,
    NeuronFailed,
    NoCapacity,
    NoRoom,
)
from cortex.fleet import Fleet, ModelView, NeuronState
from cortex.multiplex import Failed, Generation
from helexa.neuron.v1 import neuron_pb2 as pb

log = logging.getLogger(__name__)

# The models the current request's API key may use (its ids or aliases); None: any. Set by
# the key check for the request's task (cortex.auth).
KEY_MODELS: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar(
    "key_models", default=None
)

# Failures of a generation before its first message that another neuron may not share.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
# Of those, the ones that may mean the request itself breaks a neuron: such a request is
# retried on one other neuron, not across the fleet.
_BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Of those, the ones that mean "busy or going away" rather than "broken": 503, not 502.
_CAPACITY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
# The neuron names fields after the proto (its message starts with the field's path); clients
# know OpenAI's names. The first pattern the whole path matches names the param.
_PARAMS = [
    (re.compile(p), name)
    for p, name in (
        (r"chat\.messages\[(\d+)\]\.tool_calls\[(\d+)\]\.(arguments|name)",
         r"messages[\1].tool_calls[\2].function.\3"),
        (r"chat\.messages(.*)", r"messages\1"),
        (r"input", "messages"),
        (r"tools\[(\d+)\]\.(name|description|parameters)", r"tools[\1].function.\2"),
        (r"output\.json_schema", "response_format.json_schema.schema"),
        (r"output(\.json_object)?", "response_format"),
        (r"tool_choice(\..*)?", "tool_choice"),
    )
]  # fmt: skip


def least_loaded(candidates: list[NeuronState]) -> NeuronState | None:
    """The least loaded neuron, ties broken by name: deterministic for a given state."""
    return min(candidates, key=lambda n: (n.load(), n.name), default=None)


def eviction_order(
    neuron: NeuronState,
    catalogue: Catalogue,
    placing: str,
    pins: frozenset[tuple[str, str]] = frozenset(),
) -> list[ModelView]:
    """Models on ``neuron`` that may be unloaded, least recently used first.

    READY, not pinned in the catalogue nor on this neuron (``pins``: (neuron, model) pairs an
    admin pinned), nothing in flight or waiting on the neuron and none
    of cortex's own requests on it, and not the model being placed.
    """
    victims = []
    for model in neuron.models.values():
        entry = catalogue.find(model.id)
        if (
            model.state == "READY"
            and model.id != placing
            and not (entry is not None and entry.pinned)
            and (neuron.name, model.id) not in pins
            and model.in_flight == 0
            and model.waiting == 0
            and not neuron.active.get(model.id)
        ):
            victims.append(model)
    return sorted(victims, key=lambda m: (m.recency, m.id))


class Router:
    """Routing, placement with eviction, and generation with retry before the first token."""

    def __init__(self, config: CortexConfig, fleet: Fleet, catalogue: Catalogue) -> None:
        self.config = config
        self.fleet = fleet
        self.catalogue = catalogue
        self._placing: dict[str, asyncio.Task[NeuronState]] = {}
        self.drain = DrainRate()
        self.prefixes = PrefixIndex(config.routing.prefix_entries)
        # (neuron, model) pairs an admin pinned: never evicted, like a catalogue's pinned model.
        self.pins: set[tuple[str, str]] = set()

    async def close(self) -> None:
        tasks = list(self._placing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- names ----

    def resolve(self, name: str) -> str:
        """The model id a client's name means; ``ModelNotFound`` when nothing serves it, or
        when the request's API key may not use it (``KEY_MODELS``)."""
        entry = self.catalogue.find(name)
        model_id = entry.id if entry is not None else name
        if entry is None and not any(n.routable and n.has_ready(name) for n in self.fleet.neurons):
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        if not self._key_may_use(model_id):
            raise ModelNotFound(
                f"The model '{name}' does not exist or this API key may not use it",
                param="model",
            )
        return model_id

    def model_ids(self) -> list[str]:
        """Every model in the catalogue, then every other model READY on an up neuron (those
        the request's API key may use)."""
        ids = [m.id for m in self.catalogue.models]
        loaded = {
            m.id
            for n in self.fleet.neurons
            if n.routable
            for m in n.models.values()
            if m.state == "READY"
        }
        return [m for m in ids + sorted(loaded - set(ids)) if self._key_may_use(m)]

    def _key_may_use(self, model_id: str) -> bool:
        allowed = KEY_MODELS.get()
        if allowed is None:
            return True
        ids = {(e.id if (e := self.catalogue.find(name)) else name) for name in allowed}
        return model_id in ids

    # ---- choosing a neuron ----

    async def acquire(
        self, model_id: str, exclude: set[str], request: pb.GenerateRequest | None = None
    ) -> NeuronState:
        """The neuron to send a request for ``model_id`` to, placing the model if needed:
        the least loaded, or with ``request`` under the cache_aware policy, the one most
        likely to hold its prompt's beginning unless that one is too busy (``affinity``)."""
        ready = [
            n
            for n in self.fleet.neurons
            if n.routable and n.name not in exclude and n.has_ready(model_id)
        ]
        candidates = [n for n in ready if not n.full(model_id)]
        chosen = least_loaded(candidates)
        # Prompt beginnings matter only where another neuron could have served them: a lone
        # neuron's prompts are not hashed (the index learns once a second one holds the model).
        several = len(ready) > 1
        if (
            several
            and chosen is not None
            and request is not None
            and self.config.routing.cache_aware
        ):
            keys = prefix_keys(request)
            found = self.prefixes.holder(keys, {n.name for n in candidates})
            if found is not None:
                holder = next(n for n in candidates if n.name == found[0])
                margin = self.config.routing.balance_margin
                if holder.model_load(model_id) <= chosen.model_load(model_id) + margin:
                    chosen = holder
                metrics.PREFIX_ROUTES.labels(
                    result="cached" if chosen is holder else "balanced"
                ).inc()
            else:
                metrics.PREFIX_ROUTES.labels(result="unseen").inc()
            self.prefixes.served(keys, chosen.name)
        if chosen is not None:
            return chosen
        if ready:
            metrics.REJECTIONS.labels(reason="saturated").inc()
            raise NoCapacity(f"every neuron serving '{model_id}' has its queue full")
        entry = self.catalogue.find(model_id)
        if entry is None:
            raise NoCapacity(f"no healthy neuron holds the model '{model_id}' now")
        task = self._placing.get(model_id)
        if task is None:
            task = asyncio.create_task(self._place(entry, frozenset(exclude)))
            self._placing[model_id] = task
            task.add_done_callback(lambda _: self._placing.pop(model_id, None))
        # Shielded: a client that goes away must not cancel a load others wait on.
        return await asyncio.shield(task)

    async def _place(self, entry: CatalogueModel, exclude: frozenset[str]) -> NeuronState:
        started = time.monotonic()

        def allowed_now() -> list[NeuronState]:
            return [
                n
                for n in self.fleet.neurons
                if n.routable
                and n.name not in exclude
                and (not entry.neurons or n.name in entry.neurons)
            ]

        # Placement is rare and slow: decide on fresh free memory and last-used times.
        await asyncio.gather(*(self.fleet.refresh(n) for n in allowed_now()))
        allowed = allowed_now()
        if not allowed:
            metrics.REJECTIONS.labels(reason="no_neuron").inc()
            raise NoCapacity(f"no healthy neuron may hold the model '{entry.id}' now")
        loading = [n for n in allowed if entry.id in n.models]
        fits = [n for n in allowed if n.free_bytes(entry.device) >= entry.memory]
        if loading:  # loading there already (or READY since the last poll): join that load
            target = min(loading, key=lambda n: n.name)
        elif fits:
            target = min(fits, key=lambda n: (-n.free_bytes(entry.device), n.name))
        else:
            target = await self._evict_for(entry, allowed)
        await self.load(target, entry)
        metrics.PLACEMENT_SECONDS.labels(model=entry.id).observe(time.monotonic() - started)
        return target

    async def _evict_for(self, entry: CatalogueModel, allowed: list[NeuronState]) -> NeuronState:
        """Unload LRU idle unpinned models until one allowed neuron has room for ``entry``."""
        while True:
            feasible: list[tuple[float, str, str, NeuronState, ModelView]] = []
            for neuron in allowed:
                victims = eviction_order(neuron, self.catalogue, entry.id, frozenset(self.pins))
                freeable = sum(v.resident_bytes for v in victims)
                if victims and neuron.free_bytes(entry.device) + freeable >= entry.memory:
                    first = victims[0]
                    feasible.append((first.recency, neuron.name, first.id, neuron, first))
            if not feasible:
                metrics.REJECTIONS.labels(reason="no_room").inc()
                raise NoCapacity(
                    f"no room for the model '{entry.id}' ({entry.memory} bytes): every allowed "
                    "neuron is full of pinned or busy models"
                )
            _, _, _, neuron, victim = min(feasible, key=lambda f: f[:3])
            await self._evict(neuron, victim, entry.id)
            if neuron.free_bytes(entry.device) >= entry.memory:
                return neuron

    async def _evict(self, neuron: NeuronState, victim: ModelView, placing: str) -> None:
        started = time.monotonic()
        try:
            reply = await neuron.stub.UnloadModel(
                pb.UnloadModelRequest(id=victim.id), timeout=self.config.timeouts.load
            )
        except grpc.aio.AioRpcError as e:
            self.fleet.poke(neuron)
            raise NoCapacity(
                f"evicting '{victim.id}' from neuron {neuron.name} failed: {e.details()}"
            ) from e
        metrics.EVICTIONS.labels(model=victim.id, neuron=neuron.name).inc()
        log.info(
            "evicted model=%s neuron=%s for=%s freed_bytes=%d seconds=%.2f",
            victim.id, neuron.name, placing, reply.freed_bytes, time.monotonic() - started,
        )  # fmt: skip
        await self.fleet.refresh(neuron)

    async def load(self, neuron: NeuronState, entry: CatalogueModel) -> bool:
        """``LoadModel`` of ``entry`` on ``neuron``; whether it was already loaded there.
        ``NoRoom`` when the neuron has no room for it."""
        started = time.monotonic()
        try:
            reply = await neuron.stub.LoadModel(
                pb.LoadModelRequest(spec=entry.to_proto()), timeout=self.config.timeouts.load
            )
        except grpc.aio.AioRpcError as e:
            metrics.PLACEMENTS.labels(model=entry.id, neuron=neuron.name, result="failed").inc()
            self.fleet.poke(neuron)
            log.warning(
                "placement failed model=%s neuron=%s code=%s error=%s",
                entry.id, neuron.name, e.code().name, e.details(),
            )  # fmt: skip
            if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise Forbidden(
                    f"neuron {neuron.name} may not load '{entry.id}': {e.details()}"
                ) from e
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise NoRoom(
                    f"neuron {neuron.name} has no room for '{entry.id}': {e.details()}"
                ) from e
            if e.code() in _CAPACITY:
                raise NoCapacity(
                    f"neuron {neuron.name} cannot load '{entry.id}' now: {e.details()}"
                ) from e
            raise NeuronFailed(
                f"neuron {neuron.name} failed to load '{entry.id}': {e.details()}"
            ) from e
        metrics.PLACEMENTS.labels(model=entry.id, neuron=neuron.name, result="loaded").inc()
        log.info(
            "placed model=%s neuron=%s already_loaded=%s seconds=%.2f",
            entry.id, neuron.name, reply.already_loaded, time.monotonic() - started,
        )  # fmt: skip
        await self.fleet.refresh(neuron)
        return bool(reply.already_loaded)

    # ---- saying "not now" ----

    def queued(self, model_id: str) -> int:
        """Requests for ``model_id`` waiting beyond the batch slots of every up neuron."""
        return sum(
            max(0, n.model_load(model_id) - n.models[model_id].max_batch_size)
            for n in self.fleet.neurons
            if n.routable and n.has_ready(model_id)
        )

    def retry_after(self, model_id: str) -> int:
        timeouts = self.config.timeouts
        return self.drain.retry_after(
            model_id, self.queued(model_id), timeouts.retry_after, timeouts.retry_after_max
        )

    def _admit(self, model_id: str) -> None:
        """Refuse at once a request whose expected wait (the requests queued ahead of it over
        the measured drain rate) exceeds ``timeouts.queue``: a 503 with Retry-After before
        any byte, which clients retry by themselves, instead of a wait that ends in one."""
        rate = self.drain.rate(model_id)
        queued = self.queued(model_id)
        if rate <= 0 or not queued:
            return
        wait = queued / rate
        if wait > self.config.timeouts.queue:
            metrics.REJECTIONS.labels(reason="expected_wait").inc()
            raise NoCapacity(
                f"'{model_id}' has {queued} requests queued, about {wait:.0f} s of work at "
                f"its measured rate: more than timeouts.queue ({self.config.timeouts.queue:g} s)",
                self.retry_after(model_id),
            )

    # ---- generation ----

    async def open(
        self,
        model_id: str,
        request: pb.GenerateRequest,
        param: Callable[[str], str] | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> Stream:
        """Send ``request`` to a neuron and return once its first message is there to take,
        trying others until one gets that far. A field the neuron refuses is a 400 naming it
        as ``param`` says (OpenAI chat's names by default). ``exclude``: neurons not to try
        (those that failed a stream being resumed, which is work already begun: it is not
        refused for the expected wait)."""
        timeouts = self.config.timeouts
        if not exclude:
            self._admit(model_id)
        tried: set[str] = set(exclude)
        failures: list[tuple[grpc.StatusCode, str]] = []
        queue_deadline: float | None = None
        while True:
            try:
                neuron = await self.acquire(model_id, tried, request)
            except NoCapacity as e:
                raise self._none_left(model_id, e, failures) from None
            if queue_deadline is None:
                queue_deadline = time.monotonic() + timeouts.queue
            request.queue_timeout = queue_deadline - time.monotonic()
            if request.queue_timeout <= 0:
                metrics.REJECTIONS.labels(reason="queue_timeout").inc()
                raise NoCapacity(
                    f"no neuron had room for '{model_id}' within timeouts.queue "
                    f"({timeouts.queue:g} s)",
                    self.retry_after(model_id),
                )
            tried.add(neuron.name)
            neuron.begin(model_id)
            generation = neuron.generations.start(request, timeouts.request)
            stream = Stream(self, neuron, model_id, generation)
            try:
                async with asyncio.timeout(timeouts.accept):  # no task, unlike wait_for
                    await generation.accepted()
                await generation.started()
                return stream
            except BaseException as e:
                stream.close()  # stops the neuron when the client left
                if not isinstance(e, (Failed, TimeoutError)):
                    raise
                if isinstance(e, TimeoutError):
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    details = f"did not take the request within {timeouts.accept:g} s"
                else:
                    code, details = e.code, e.details
            _raise_unless_retryable(neuron, code, details, failures, param)
            failures.append((code, details))
            metrics.RETRIES.labels(model=model_id, code=code.name).inc()
            log.warning(
                "retrying on another neuron model=%s neuron=%s code=%s error=%s",
                model_id, neuron.name, code.name, details,
            )  # fmt: skip
            self.fleet.poke(neuron)

    def _none_left(
        self, model_id: str, error: NoCapacity, failures: list[tuple[grpc.StatusCode, str]]
    ) -> CortexError:
        """What a request ends with when no neuron (or none more) can take it."""
        if any(code not in _CAPACITY for code, _ in failures):
            code, details = failures[-1]
            return NeuronFailed(f"the neuron failed the request: {code.name}: {details}")
        message = error.message
        if failures:
            code, details = failures[-1]
            message = f"no neuron can take the request now: {code.name}: {details}"
        return NoCapacity(message, self.retry_after(model_id))

    # ---- counting ----

    async def count_tokens(
        self,
        model_id: str,
        request: pb.GenerateRequest,
        param: Callable[[str], str] | None = None,
    ) -> int:
        """The tokens of ``request``'s input as a neuron holding ``model_id`` renders it
        (placing the model if none does), trying another while one is gone or busy; a field
        the neuron refuses is named as ``open`` names it."""
        tried: set[str] = set()
        failures: list[tuple[grpc.StatusCode, str]] = []
        while True:
            try:
                neuron = await self.acquire(model_id, tried)
            except NoCapacity as e:
                raise self._none_left(model_id, e, failures) from None
            tried.add(neuron.name)
            neuron.begin(model_id)  # not evicted while it counts
            try:
                # Rendering and a tool schema's first compile: bounded as a stall is.
                reply = await neuron.stub.CountTokens(request, timeout=self.config.timeouts.stall)
                return int(reply.input_tokens)
            except grpc.aio.AioRpcError as e:
                code, details = e.code(), e.details() or ""
            finally:
                neuron.end(model_id)
            _raise_unless_retryable(neuron, code, details, failures, param)
            failures.append((code, details))
            self.fleet.poke(neuron)


class Stream:
    """A generation that has begun on a neuron: ``take`` its messages as they come (the one
    with a finish reason is the last), ``wait`` for more, and ``close`` it when done with it."""

    __slots__ = (
        "_closed", "_cut", "_finished", "_router", "failure", "generation", "model_id", "neuron",
    )  # fmt: skip

    def __init__(
        self, router: Router, neuron: NeuronState, model_id: str, generation: Generation
    ) -> None:
        self._router = router
        self.neuron = neuron
        self.model_id = model_id
        self.generation = generation
        self._finished = self._closed = False
        self._cut: CortexError | None = None
        # The status the generation failed with mid-stream, once it has.
        self.failure: grpc.StatusCode | None = None

    def cut(self, error: CortexError) -> None:
        """End the stream here with ``error`` (cortex's drain past its bound): the generation
        stops on the neuron, and the next ``take`` raises ``error``."""
        if self._cut is None and not self._finished:
            self._cut = error
            self.generation.cancel()  # wakes a waiter

    def take(self) -> list[pb.GenerateResponse]:
        """What came since the last take; ``NeuronFailed`` once the generation failed."""
        if self._cut is not None:
            raise self._cut
        try:
            messages = self.generation.take()
        except Failed as e:
            self._router.fleet.poke(self.neuron)
            self.failure = e.code
            raise NeuronFailed(
                f"neuron {self.neuron.name} failed mid-stream: {e.code.name}: {e.details}"
            ) from None
        if messages and messages[-1].finish_reason:
            self._finished = True
        return messages

    async def wait(self, until: float) -> bool:
        """Wait for something to take: False if the loop's clock reached ``until`` first."""
        return await self.generation.wait(until)

    def close(self) -> None:
        """Let go of the neuron, stopping the generation there if it is still going."""
        if self._closed:
            return
        self._closed = True
        self.generation.cancel()  # a no-op once finished
        self.neuron.end(self.model_id)
        if self._finished:
            self._router.drain.finished(self.model_id)


def _raise_unless_retryable(
    neuron: NeuronState,
    code: grpc.StatusCode,
    details: str,
    failures: list[tuple[grpc.StatusCode, str]],
    param: Callable[[str], str] | None,
) -> None:
    """A neuron's refusal that another neuron would share is the client's to see: a field it
    refuses (named as ``param`` says), or a failure not worth another try (one that broke a
    neuron, after one already did)."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise _bad_request(details, param or openai_param)
    broke_before = any(c in _BROKEN for c, _ in failures)
    if code not in _RETRYABLE or (code in _BROKEN and broke_before):
        raise NeuronFailed(f"neuron {neuron.name} failed the request: {code.name}: {details}")


def openai_param(field: str) -> str:
    """The OpenAI name of the proto field the neuron named (``tools[2].parameters`` is
    ``tools[2].function.parameters``); any other name is the same in both."""
    for pattern, name in _PARAMS:
        match = pattern.fullmatch(field)
        if match is not None:
            return match.expand(name)
    return field


def _bad_request(details: str, name: Callable[[str], str]) -> BadRequest:
    """The neuron's INVALID_ARGUMENT ("field: why") as a 400 naming the client's field."""
    field, sep, why = details.partition(":")
    if not sep:
        return BadRequest(details)
    param = name(field)
    return BadRequest(param + sep + why, param=param)
