"""The fleet: one long-lived gRPC channel per neuron and a poller that keeps its state fresh.

Generations go over the channel's one ``GenerateMany`` call (``cortex.multiplex``).

Each poll asks a neuron for its health, ``Info`` and ``ListModels``. A neuron that fails
``down_after_failures`` polls in a row is marked down and gets no requests; it is up again as
soon as one poll answers. Health NOT_SERVING or ``Info.draining`` marks it draining: it keeps
its open streams but gets nothing new. An admin may drain a neuron in cortex alone
(``drained``): it gets nothing new either, and its process stays up for maintenance. Cortex
reaches each neuron only at the endpoint its config names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cortex import metrics
from cortex.config import CortexConfig, FleetConfig, NeuronEndpoint
from cortex.multiplex import Multiplexer
from cortex.neuronlink import Link, open_channel
from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

UNKNOWN, UP, DOWN, DRAINING = "unknown", "up", "down", "draining"
_STATE_NAMES = {
    pb.MODEL_STATE_LOADING: "LOADING",
    pb.MODEL_STATE_READY: "READY",
    pb.MODEL_STATE_UNLOADING: "UNLOADING",
    pb.MODEL_STATE_FAILED: "FAILED",
}
_STAGE_NAMES = {
    pb.LOAD_STAGE_DOWNLOADING: "downloading",
    pb.LOAD_STAGE_MATERIALISING: "materialising",
    pb.LOAD_STAGE_LOADING_WEIGHTS: "loading weights",
    pb.LOAD_STAGE_WARMING_UP: "warming up",
}
_UNIT_NAMES = {pb.LOAD_UNIT_BYTES: "bytes", pb.LOAD_UNIT_TENSORS: "tensors"}


@dataclass(frozen=True)
class DeviceView:
    """A neuron's device as of the last poll."""

    name: str
    description: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class ModelView:
    """A model on a neuron as of the last poll."""

    id: str
    state: str
    device: str
    resident_bytes: int
    loaded_at: float
    last_used: float
    in_flight: int
    waiting: int
    error: str = ""
    # The neuron's bounds for it: requests generated at once, and waiting (0: not reported).
    max_batch_size: int = 0
    max_waiting: int = 0
    # While LOADING: the load's stage ("" before the first) and how much of load_total (0: not
    # known) is done, counted in load_unit ("bytes", "tensors"; "" when not measured).
    load_stage: str = ""
    load_unit: str = ""
    load_done: int = 0
    load_total: int = 0

    @property
    def recency(self) -> float:
        """When it was last of use: its last request, else its load."""
        return self.last_used or self.loaded_at


@dataclass
class NeuronState:
    """What cortex knows of one neuron, and its channel."""

    name: str
    endpoint: str
    channel: grpc.aio.Channel
    stub: pb_grpc.NeuronStub
    health: health_pb2_grpc.HealthStub
    generations: Multiplexer  # every generation goes over its one GenerateMany call
    status: str = UNKNOWN
    # Drained by an admin: no new requests or placements here until undrained.
    drained: bool = False
    failures: int = 0
    error: str = ""
    host: str = ""
    version: str = ""
    polled_at: float = 0.0
    devices: list[DeviceView] = field(default_factory=list)
    models: dict[str, ModelView] = field(default_factory=dict)
    # cortex's own requests on this neuron, in total and per model (fresher than any poll).
    in_flight: int = 0
    active: dict[str, int] = field(default_factory=dict)
    own_at_poll: int = 0
    active_at_poll: dict[str, int] = field(default_factory=dict)

    @property
    def routable(self) -> bool:
        return self.status == UP and not self.drained

    def has_ready(self, model_id: str) -> bool:
        model = self.models.get(model_id)
        return model is not None and model.state == "READY"

    def load(self) -> int:
        """How busy it is: cortex's own requests now, plus others' as of the last poll.

        The poll's in-flight and waiting counts include cortex's own requests of that moment;
        those are taken out, since ``in_flight`` is fresher, so a stale poll cannot make an
        idle neuron look busy.
        """
        polled = sum(m.in_flight + m.waiting for m in self.models.values())
        return max(0, polled - self.own_at_poll) + self.in_flight

    def model_load(self, model_id: str) -> int:
        """Requests for one model here, running or waiting: cortex's own now, others' polled."""
        model = self.models.get(model_id)
        polled = model.in_flight + model.waiting if model is not None else 0
        others = max(0, polled - self.active_at_poll.get(model_id, 0))
        return others + self.active.get(model_id, 0)

    def full(self, model_id: str) -> bool:
        """Whether the model's batch and queue here are known to be full (a new call is refused)."""
        model = self.models.get(model_id)
        if model is None or not model.max_waiting:
            return False
        return self.model_load(model_id) >= model.max_batch_size + model.max_waiting

    def free_bytes(self, device: str = "auto") -> int:
        """The most memory free on one device matching ``device`` (auto, cpu, cuda, cuda:N)."""
        frees = [d.free_bytes for d in self.devices if _device_matches(device, d.name)]
        return max(frees, default=0)

    def begin(self, model_id: str) -> None:
        self.in_flight += 1
        self.active[model_id] = self.active.get(model_id, 0) + 1
        metrics.IN_FLIGHT.labels(neuron=self.name).set(self.in_flight)

    def end(self, model_id: str) -> None:
        self.in_flight -= 1
        self.active[model_id] -= 1
        if not self.active[model_id]:
            del self.active[model_id]
        metrics.IN_FLIGHT.labels(neuron=self.name).set(self.in_flight)


def _device_matches(wanted: str, name: str) -> bool:
    if wanted == "auto":
        return True
    if wanted == "cuda":
        return name.startswith("cuda")
    return wanted == name


def channel_options(config: FleetConfig) -> list[tuple[str, int]]:
    """Keepalive so a vanished host fails open streams; quick reconnects so a restart is seen."""
    return [
        ("grpc.keepalive_time_ms", int(config.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.max_receive_message_length", 64 << 20),
    ]


class Fleet:
    """Every configured neuron and the poller that keeps their state fresh."""

    def __init__(self, config: CortexConfig, links: dict[str, Link]) -> None:
        self.config = config.fleet
        self.neurons: list[NeuronState] = [self._connect(n, links[n.name]) for n in config.neurons]
        self._poller: asyncio.Task[None] | None = None
        self._pokes: set[asyncio.Task[None]] = set()

    def _connect(self, endpoint: NeuronEndpoint, link: Link) -> NeuronState:
        channel = open_channel(endpoint.endpoint, link, channel_options(self.config))
        metrics.NEURON_UP.labels(neuron=endpoint.name).set(0)
        stub = pb_grpc.NeuronStub(channel)
        return NeuronState(
            name=endpoint.name,
            endpoint=endpoint.endpoint,
            channel=channel,
            stub=stub,
            health=health_pb2_grpc.HealthStub(channel),
            generations=Multiplexer(stub),
        )

    def get(self, name: str) -> NeuronState | None:
        return next((n for n in self.neurons if n.name == name), None)

    def any_up(self) -> bool:
        return any(n.routable for n in self.neurons)

    async def start(self) -> None:
        """Poll every neuron once, then keep polling in the background."""
        await self.poll_all()
        self._poller = asyncio.create_task(self._poll_forever(), name="fleet-poller")

    async def close(self) -> None:
        tasks = [t for t in [self._poller, *self._pokes] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for neuron in self.neurons:
            await neuron.generations.close()
            await neuron.channel.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval)
            try:
                await self.poll_all()
            except Exception:  # a bug must not freeze the fleet's state: log, poll again
                log.exception("fleet poll failed")

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.refresh(n) for n in self.neurons))

    def poke(self, neuron: NeuronState) -> None:
        """Refresh one neuron soon, without waiting (after a call to it failed)."""
        task = asyncio.create_task(self.refresh(neuron))
        self._pokes.add(task)
        task.add_done_callback(self._pokes.discard)

    async def refresh(self, neuron: NeuronState) -> None:
        """Poll one neuron now and update its state; never raises for a neuron's failure."""
        timeout = self.config.rpc_timeout
        try:
            health = await neuron.health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            info = await neuron.stub.Info(pb.InfoRequest(), timeout=timeout)
            listed = await neuron.stub.ListModels(pb.ListModelsRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            self._failed(neuron, f"{e.code().name}: {e.details()}")
            return
        except Exception as e:  # not the neuron's answer we know: it counts as a failure
            log.exception("poll failed neuron=%s", neuron.name)
            self._failed(neuron, f"{type(e).__name__}: {e}")
            return
        serving = health.status == health_pb2.HealthCheckResponse.SERVING
        status = UP if serving and not info.draining else DRAINING
        neuron.host, neuron.version = info.host, info.version
        neuron.devices = [
            DeviceView(d.name, d.description, d.total_bytes, d.free_bytes) for d in info.devices
        ]
        neuron.models = {m.id: _model_view(m) for m in listed.models}
        neuron.own_at_poll = neuron.in_flight
        neuron.active_at_poll = dict(neuron.active)
        neuron.failures, neuron.error, neuron.polled_at = 0, "", time.time()
        self._set_status(neuron, status)
        ready = sum(1 for m in neuron.models.values() if m.state == "READY")
        metrics.MODELS_LOADED.labels(neuron=neuron.name).set(ready)

    def _failed(self, neuron: NeuronState, error: str) -> None:
        neuron.failures += 1
        neuron.error = error
        if neuron.failures >= self.config.down_after_failures and neuron.status != DOWN:
            neuron.models = {}
            neuron.devices = []
            metrics.MODELS_LOADED.labels(neuron=neuron.name).set(0)
            self._set_status(neuron, DOWN)

    def _set_status(self, neuron: NeuronState, status: str) -> None:
        if status != neuron.status:
            level = logging.WARNING if status == DOWN else logging.INFO
            log.log(
                level,
                "neuron %s neuron=%s endpoint=%s was=%s error=%s",
                status, neuron.name, neuron.endpoint, neuron.status, neuron.error or "-",
            )  # fmt: skip
        neuron.status = status
        metrics.NEURON_UP.labels(neuron=neuron.name).set(1 if status == UP else 0)
        self.show_draining(neuron)

    def set_drained(self, neuron: NeuronState, drained: bool) -> None:
        """Stop (or resume) sending new requests to ``neuron``; its open streams go on."""
        neuron.drained = drained
        self.show_draining(neuron)

    def show_draining(self, neuron: NeuronState) -> None:
        draining = neuron.status == DRAINING or neuron.drained
        metrics.NEURON_DRAINING.labels(neuron=neuron.name).set(1 if draining else 0)


def _model_view(m: pb.ModelStatus) -> ModelView:
    return ModelView(
        id=m.id,
        state=_STATE_NAMES.get(m.state, "UNKNOWN"),
        device=m.device,
        resident_bytes=m.resident_bytes,
        loaded_at=m.loaded_at,
        last_used=m.last_used,
        in_flight=m.in_flight,
        waiting=m.waiting,
        error=m.error,
        max_batch_size=m.max_batch_size,
        max_waiting=m.max_waiting,
        load_stage=_STAGE_NAMES.get(m.load.stage, ""),
        load_unit=_UNIT_NAMES.get(m.load.unit, ""),
        load_done=m.load.done,
        load_total=m.load.total,
    )
