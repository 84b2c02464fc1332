"""The router's choices are deterministic functions of the fleet's state (no I/O here)."""

from __future__ import annotations

from typing import Any

from cortex.config import Catalogue, CatalogueModel, FleetConfig
from cortex.drain import MIN_COMPLETIONS, DrainRate
from cortex.fleet import UP, ModelView, NeuronState, channel_options
from cortex.router import eviction_order, least_loaded


def _neuron(name: str, models: list[ModelView], in_flight: int = 0, **kw: Any) -> NeuronState:
    neuron = NeuronState(
        name, f"{name}:1", channel=None, stub=None, health=None, generations=None, status=UP, **kw
    )  # type: ignore[arg-type]
    neuron.models = {m.id: m for m in models}
    neuron.in_flight = in_flight
    return neuron


def _model(model_id: str, last_used: float = 0.0, in_flight: int = 0, **kw: Any) -> ModelView:
    fields: dict[str, Any] = {
        "state": "READY", "device": "cpu", "resident_bytes": 100, "loaded_at": 1.0,
        "last_used": last_used, "in_flight": in_flight, "waiting": 0,
    }  # fmt: skip
    fields.update(kw)
    return ModelView(id=model_id, **fields)


def test_least_loaded_breaks_ties_by_name_whatever_the_order() -> None:
    a, b, c = (_neuron(n, [_model("m")]) for n in ("a", "b", "c"))
    assert least_loaded([c, b, a]) is a
    assert least_loaded([b, c, a]) is a
    a.in_flight = 1
    assert least_loaded([c, a, b]) is b


def test_load_counts_own_requests_fresh_and_others_from_the_poll() -> None:
    busy = _neuron("a", [_model("m", in_flight=3)])
    busy.own_at_poll = 3  # all three were ours, and they have finished since
    idle = _neuron("b", [_model("m")], in_flight=1)
    assert busy.load() == 0
    assert idle.load() == 1
    assert least_loaded([idle, busy]) is busy
    other = _neuron("c", [_model("m", in_flight=2)])  # two from someone else
    assert other.load() == 2


def test_eviction_order_skips_pinned_busy_and_the_model_being_placed() -> None:
    catalogue = Catalogue(
        [
            CatalogueModel("pinned", path="/p", memory=1, pinned=True),
            CatalogueModel("x", path="/x", memory=1),
        ]
    )
    neuron = _neuron(
        "a",
        [
            _model("pinned", last_used=1.0),
            _model("busy", last_used=2.0, in_flight=1),
            _model("waiting", last_used=2.5, waiting=1),
            _model("new", last_used=9.0),
            _model("old", last_used=3.0),
            _model("never", last_used=0.0, loaded_at=4.0),
            _model("loading", state="LOADING"),
            _model("x", last_used=5.0),
        ],
    )
    neuron.active["old"] = 1  # cortex has a request on it right now
    assert [m.id for m in eviction_order(neuron, catalogue, placing="x")] == ["never", "new"]
    neuron.active.clear()
    assert [m.id for m in eviction_order(neuron, catalogue, placing="z")] == [
        "old", "never", "x", "new",
    ]  # fmt: skip
    # An admin's pin holds on its own neuron only.
    pins = frozenset({("a", "never"), ("b", "old")})
    assert [m.id for m in eviction_order(neuron, catalogue, placing="z", pins=pins)] == [
        "old", "x", "new",
    ]  # fmt: skip


def test_a_drained_neuron_is_up_but_not_routable() -> None:
    neuron = _neuron("a", [_model("m")])
    assert neuron.routable
    neuron.drained = True
    assert neuron.status == UP and not neuron.routable


def test_spec_sent_on_load_carries_the_catalogue_source() -> None:
    local = CatalogueModel("m", path="/srv/m.gguf", memory=1, dtype="bfloat16").to_proto()
    assert local.WhichOneof("source") == "local" and local.local.path == "/srv/m.gguf"
    assert local.dtype == "bfloat16"
    hub = CatalogueModel("h", hf_repo="org/repo", revision="v1", memory=1).to_proto()
    assert hub.WhichOneof("source") == "huggingface"
    assert (hub.huggingface.repo, hub.huggingface.revision) == ("org/repo", "v1")


def test_neuron_channels_send_keepalive_pings_the_neuron_accepts() -> None:
    options = dict(channel_options(FleetConfig()))
    assert options["grpc.keepalive_time_ms"] == 20_000
    assert options["grpc.keepalive_timeout_ms"] == 10_000
    # The neuron allows a ping every 5 s at the most (neuron.lifecycle.SERVER_OPTIONS).
    assert options["grpc.keepalive_time_ms"] >= 5_000


def test_retry_after_is_the_queue_over_the_measured_drain_rate_clamped() -> None:
    now = [100.0]
    drain = DrainRate(window=60.0, clock=lambda: now[0])
    # Nothing finished yet: nothing to measure, the configured fallback.
    assert drain.retry_after("m", queued=10, fallback=5, most=60) == 5
    for _ in range(20):  # 20 completions in 10 s: 2 per second
        now[0] += 0.5
        drain.finished("m")
    assert drain.rate("m") == 2.0
    assert drain.retry_after("m", queued=9, fallback=5, most=60) == 5  # (9 + 1) / 2
    assert drain.retry_after("m", queued=0, fallback=5, most=60) == 1
    assert drain.retry_after("m", queued=999, fallback=5, most=60) == 60
    assert drain.retry_after("other", queued=9, fallback=7, most=60) == 7
    now[0] += 120  # a window with no completion: back to the fallback
    assert drain.retry_after("m", queued=9, fallback=5, most=60) == 5


def test_the_drain_rate_is_not_known_from_a_first_few_answers() -> None:
    now = [100.0]
    drain = DrainRate(window=60.0, clock=lambda: now[0])
    # One answer in cortex's first fraction of a second is no measure: not a rate of 1/s,
    # which would refuse a burst of 64 as a minute's work.
    now[0] += 0.1
    drain.finished("m")
    assert drain.rate("m") == 0.0
    assert drain.retry_after("m", queued=10, fallback=5, most=60) == 5
    for _ in range(MIN_COMPLETIONS - 2):
        now[0] += 0.01
        drain.finished("m")
    assert drain.rate("m") == 0.0  # one short of MIN_COMPLETIONS
    now[0] += 0.01
    drain.finished("m")
    assert drain.rate("m") == MIN_COMPLETIONS  # over cortex's first second, at the least
    # Up a whole window: even one completion in it is a measure.
    slow = DrainRate(window=60.0, clock=lambda: now[0])
    now[0] += 61
    slow.finished("m")
    assert slow.rate("m") == 1 / 60
