"""The admin API (``/admin/v1``): the fleet as cortex sees it; load, unload, pin and unpin a
catalogue model on a named neuron; drain and undrain a neuron in cortex; reload the catalogue.

Every request needs an admin key (``cortex.auth``), and each action is logged with the key's
name (``admin=``), never the key. Answers are JSON; failures are OpenAI's error envelope, as on
``/v1``: an unknown neuron or model 404, an action that cannot be done as asked (a model with
no room, a neuron down) 409 with the reason. An action is done whole or not at all: a load the
neuron refuses is undone there, so the fleet is left as it was.

Draining here is cortex's alone: the neuron gets no new requests or placements from this cortex
and its open streams finish, while its process stays up (for maintenance, or to load models
before it takes traffic again). It lasts until undrained or until cortex restarts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from aiohttp import web

from cortex.api import Gateway, gateway_of
from cortex.auth import ADMIN
from cortex.config import CatalogueModel, load_catalogue_of
from cortex.errors import (
    CatalogueInvalid,
    CortexError,
    DoesNotFit,
    ModelNotFound,
    NeuronFailed,
    NeuronNotFound,
    NoRoom,
)
from cortex.fleet import UP, NeuronState
from cortex.fleetstatus import as_json
from helexa.configfile import ConfigError
from helexa.neuron.v1 import neuron_pb2 as pb

log = logging.getLogger(__name__)

PREFIX = "/admin/v1"


def add_routes(app: web.Application) -> None:
    app.router.add_get(f"{PREFIX}/fleet", fleet)
    app.router.add_post(f"{PREFIX}/neurons/{{neuron}}/drain", drain)
    app.router.add_post(f"{PREFIX}/neurons/{{neuron}}/undrain", undrain)
    for action, handler in (("load", load), ("unload", unload), ("pin", pin), ("unpin", unpin)):
        app.router.add_post(f"{PREFIX}/neurons/{{neuron}}/models/{{model}}/{action}", handler)
    app.router.add_post(f"{PREFIX}/catalogue/reload", reload_catalogue)


# ---- views ----


def fleet_view(gateway: Gateway) -> dict[str, Any]:
    """What ``cortex status --json`` shows (``cortex.fleetstatus``), with what only this cortex
    knows: each neuron's admin drain, its requests from here and the load routing compares, an
    admin's pins, and the catalogue."""
    body = as_json(gateway.fleet, gateway.router.catalogue)
    pins = gateway.router.pins
    for view, neuron in zip(body["neurons"], gateway.fleet.neurons, strict=True):
        view["drained"] = neuron.drained
        view["in_flight"] = neuron.in_flight
        view["routing_load"] = neuron.load()
        view["polled_at"] = neuron.polled_at
        for model in view["models"]:
            model["pinned"] = model["pinned"] or (neuron.name, model["id"]) in pins
            model["in_catalogue"] = gateway.router.catalogue.find(model["id"]) is not None
    body["routable"] = sum(n.routable for n in gateway.fleet.neurons)
    body["catalogue"] = [m.id for m in gateway.router.catalogue.models]
    return body


def neuron_view(gateway: Gateway, neuron: NeuronState) -> dict[str, Any]:
    """One neuron as the fleet view shows it."""
    return next(v for v in fleet_view(gateway)["neurons"] if v["name"] == neuron.name)


def model_view(gateway: Gateway, neuron: NeuronState, model_id: str) -> dict[str, Any]:
    """One model on a neuron as the fleet view shows it (just its id if it is not there)."""
    models = neuron_view(gateway, neuron)["models"]
    return next((m for m in models if m["id"] == model_id), {"id": model_id})


async def fleet(request: web.Request) -> web.Response:
    return web.json_response(fleet_view(gateway_of(request)))


# ---- what an action names ----


def _neuron(request: web.Request) -> NeuronState:
    name = request.match_info["neuron"]
    neuron = gateway_of(request).fleet.get(name)
    if neuron is None:
        raise NeuronNotFound(f"no neuron is named '{name}'", param="neuron")
    return neuron


def _entry(request: web.Request) -> CatalogueModel:
    name = request.match_info["model"]
    entry = gateway_of(request).router.catalogue.find(name)
    if entry is None:
        raise ModelNotFound(f"the model '{name}' is not in the catalogue", param="model")
    return entry


def _done(request: web.Request, action: str, **fields: object) -> None:
    detail = " ".join(f"{k}={v}" for k, v in fields.items())
    log.info("admin action=%s admin=%s %s", action, request[ADMIN], detail)


# ---- draining ----


async def drain(request: web.Request) -> web.Response:
    return _set_drained(request, True)


async def undrain(request: web.Request) -> web.Response:
    return _set_drained(request, False)


def _set_drained(request: web.Request, drained: bool) -> web.Response:
    gateway = gateway_of(request)
    neuron = _neuron(request)
    was = neuron.drained
    gateway.fleet.set_drained(neuron, drained)
    action = "drain" if drained else "undrain"
    _done(request, action, neuron=neuron.name, was_drained=was, in_flight=neuron.in_flight)
    return web.json_response(neuron_view(gateway, neuron))


# ---- models ----


async def load(request: web.Request) -> web.Response:
    """Load a catalogue model on the named neuron, if it has room; no eviction (an admin's load
    unloads nothing): a model that does not fit is a 409 saying what it needs and what is free."""
    gateway = gateway_of(request)
    neuron, entry = _neuron(request), _entry(request)
    if entry.neurons and neuron.name not in entry.neurons:
        raise DoesNotFit(
            f"the catalogue allows '{entry.id}' only on {', '.join(entry.neurons)}, not on "
            f"neuron {neuron.name}"
        )
    await gateway.fleet.refresh(neuron)
    if neuron.status != UP:
        why = f": {neuron.error}" if neuron.error else ""
        raise DoesNotFit(f"neuron {neuron.name} is {neuron.status}{why}")
    held = neuron.models.get(entry.id)
    if held is None or held.state == "FAILED":
        free = neuron.free_bytes(entry.device)
        if free < entry.memory:
            raise DoesNotFit(
                f"'{entry.id}' needs {entry.memory} bytes (its catalogue memory) on device "
                f"{entry.device}; neuron {neuron.name} has {free} free: unload a model there first"
            )
    try:
        already = await gateway.router.load(neuron, entry)
    except CortexError as e:
        if held is None:  # leave the fleet as it was: no FAILED entry behind
            await _forget_failed(gateway, neuron, entry.id)
        if isinstance(e, NoRoom):
            raise DoesNotFit(e.message) from None
        raise
    _done(request, "load", neuron=neuron.name, model=entry.id, already_loaded=already)
    return web.json_response(
        {
            "neuron": neuron.name,
            "model": model_view(gateway, neuron, entry.id),
            "already_loaded": already,
        }
    )


async def _forget_failed(gateway: Gateway, neuron: NeuronState, model_id: str) -> None:
    """Drop the FAILED entry a refused load leaves on the neuron (an unload forgets it)."""
    try:
        await neuron.stub.UnloadModel(
            pb.UnloadModelRequest(id=model_id), timeout=gateway.config.fleet.rpc_timeout
        )
    except grpc.aio.AioRpcError as e:
        log.warning(
            "could not forget a failed load model=%s neuron=%s error=%s",
            model_id, neuron.name, e.details(),
        )  # fmt: skip
    await gateway.fleet.refresh(neuron)


async def unload(request: web.Request) -> web.Response:
    """Unload a model from the named neuron once its requests there end (pinned or not: a pin
    keeps a model from eviction, not from an admin); a catalogue model or any model there."""
    gateway = gateway_of(request)
    neuron = _neuron(request)
    name = request.match_info["model"]
    entry = gateway.router.catalogue.find(name)
    model_id = entry.id if entry is not None else name
    if entry is None and model_id not in neuron.models:
        raise ModelNotFound(
            f"the model '{name}' is not in the catalogue nor on neuron {neuron.name}",
            param="model",
        )
    try:
        reply = await neuron.stub.UnloadModel(
            pb.UnloadModelRequest(id=model_id), timeout=gateway.config.timeouts.load
        )
    except grpc.aio.AioRpcError as e:
        gateway.fleet.poke(neuron)
        raise NeuronFailed(
            f"neuron {neuron.name} failed to unload '{model_id}': {e.code().name}: {e.details()}"
        ) from e
    gateway.router.pins.discard((neuron.name, model_id))
    await gateway.fleet.refresh(neuron)
    _done(
        request, "unload", neuron=neuron.name, model=model_id,
        was_loaded=reply.was_loaded, freed_bytes=reply.freed_bytes,
    )  # fmt: skip
    return web.json_response(
        {
            "neuron": neuron.name,
            "model": model_id,
            "was_loaded": reply.was_loaded,
            "freed_bytes": reply.freed_bytes,
        }
    )


async def pin(request: web.Request) -> web.Response:
    """Keep a catalogue model READY on the named neuron from eviction (until unpinned,
    unloaded, or cortex restarts)."""
    gateway = gateway_of(request)
    neuron, entry = _neuron(request), _entry(request)
    if not neuron.has_ready(entry.id):
        raise DoesNotFit(f"'{entry.id}' is not READY on neuron {neuron.name}: load it first")
    gateway.router.pins.add((neuron.name, entry.id))
    _done(request, "pin", neuron=neuron.name, model=entry.id)
    return web.json_response({"neuron": neuron.name, "model": entry.id, "pinned": True})


async def unpin(request: web.Request) -> web.Response:
    gateway = gateway_of(request)
    neuron, entry = _neuron(request), _entry(request)
    if entry.pinned:
        raise DoesNotFit(
            f"'{entry.id}' is pinned in the catalogue (models.toml): edit it there and reload "
            "the catalogue"
        )
    was = (neuron.name, entry.id) in gateway.router.pins
    gateway.router.pins.discard((neuron.name, entry.id))
    _done(request, "unpin", neuron=neuron.name, model=entry.id, was_pinned=was)
    return web.json_response({"neuron": neuron.name, "model": entry.id, "pinned": False})


# ---- the catalogue ----


async def reload_catalogue(request: web.Request) -> web.Response:
    """Read models.toml again; one that cannot be used is a 422 and the catalogue stays."""
    gateway = gateway_of(request)
    old = gateway.router.catalogue
    if gateway.config_path is None:
        raise CatalogueInvalid("this cortex was not started from a config file")
    try:
        catalogue = await asyncio.to_thread(load_catalogue_of, gateway.config, gateway.config_path)
    except ConfigError as e:
        log.error("catalogue not reloaded admin=%s error=%s", request[ADMIN], e)
        raise CatalogueInvalid(
            f"the catalogue was not reloaded, keeping its {len(old.models)} models: {e}"
        ) from None
    before, after = {m.id for m in old.models}, {m.id for m in catalogue.models}
    gateway.catalogue = gateway.router.catalogue = catalogue
    added, removed = sorted(after - before), sorted(before - after)
    changed = sorted(i for i in before & after if old.find(i) != catalogue.find(i))
    _done(
        request, "reload_catalogue", models=len(after), added=",".join(added) or "-",
        removed=",".join(removed) or "-", changed=",".join(changed) or "-",
    )  # fmt: skip
    return web.json_response(
        {
            "models": [m.id for m in catalogue.models],
            "added": added,
            "removed": removed,
            "changed": changed,
        }
    )
