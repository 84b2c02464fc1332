"""The fleet as ``cortex status`` shows it: a table for people, or JSON for scripts.

Both say the same facts: each neuron's status, endpoint and devices, and each model's state;
a loading model also its stage and progress (``LOADING 37% downloading 52.1 of 140.2 GB``).
The table is drawn from the JSON: the admin API's fleet view (what a running cortex knows,
its drains and requests in flight too) or a poll of the neurons by ``cortex status --direct``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from cortex.config import Catalogue
from cortex.fleet import UP, Fleet, ModelView


def as_json(fleet: Fleet, catalogue: Catalogue) -> dict[str, Any]:
    """The fleet as plain data (byte counts as integers, times as unix seconds)."""
    neurons = []
    for n in fleet.neurons:
        models = []
        for m in sorted(n.models.values(), key=lambda m: m.id):
            model = {
                "id": m.id,
                "state": m.state,
                "device": m.device,
                "resident_bytes": m.resident_bytes,
                "loaded_at": m.loaded_at,
                "last_used": m.last_used,
                "in_flight": m.in_flight,
                "waiting": m.waiting,
                "error": m.error,
                "pinned": _pinned(catalogue, m.id),
                "load": _load(m),
            }
            models.append(model)
        neurons.append(
            {
                "name": n.name,
                "status": n.status,
                "endpoint": n.endpoint,
                "host": n.host,
                "version": n.version,
                "error": n.error,
                "devices": [asdict(d) for d in n.devices],
                "models": models,
            }
        )
    return {"neurons": neurons, "up": up_count(fleet), "total": len(fleet.neurons)}


def as_table(body: dict[str, Any]) -> str:
    """The fleet (``as_json``'s shape, or the admin API's fleet view that extends it) as lines
    of text: a neuron per line, its models under it."""
    lines = [f"{'NEURON':<16} {'STATUS':<9} {'ENDPOINT':<22} DEVICES / MODELS"]
    for n in body["neurons"]:
        devices = ", ".join(
            f"{d['name']} {_gib(d['free_bytes'])} free of {_gib(d['total_bytes'])}"
            for d in n["devices"]
        )
        detail = devices or (n["error"] or "-")
        status = "drained" if n.get("drained") else n["status"]
        in_flight = f" in_flight={n['in_flight']}" if "in_flight" in n else ""
        lines.append(f"{n['name']:<16} {status:<9} {n['endpoint']:<22} {detail}{in_flight}")
        for m in n["models"]:
            if m["state"] == "LOADING":
                lines.append(f"{'':<16}   {m['id']:<28} {f'LOADING {load_text(m)}'.rstrip()}")
                continue
            pinned = " pinned" if m["pinned"] else ""
            lines.append(
                f"{'':<16}   {m['id']:<28} {m['state']:<9} {m['device']:<7} "
                f"{_gib(m['resident_bytes']):>9} in_flight={m['in_flight']} "
                f"waiting={m['waiting']}{pinned}"
            )
    routable = f", {body['routable']} taking requests" if "routable" in body else ""
    lines.append(f"{body['up']} of {body['total']} neurons up{routable}")
    return "\n".join(lines)


def load_text(model: dict[str, Any]) -> str:
    """A loading model's stage and progress (its ``load``): ``37% downloading 52.1 of 140.2
    GB``, ``materialising 110 of 272 tensors``, ``loading weights``; "" before its first stage."""
    load = model.get("load") or {}
    stage, unit = load.get("stage", ""), load.get("unit", "")
    done, total = load.get("done", 0), load.get("total", 0)
    if not stage:
        return ""
    percent = f"{100 * done // total}% " if total else ""
    if unit == "bytes":
        scale, name = _byte_unit(total or done)
        amount = f"{done / scale:.1f}" + (f" of {total / scale:.1f}" if total else "")
        amount += f" {name}"
    elif unit:
        of = f" of {total}" if total else ""
        amount = f"{done}{of} {unit}"
    else:
        amount = ""
    return f"{percent}{stage} {amount}".rstrip()


def up_count(fleet: Fleet) -> int:
    return sum(n.status == UP for n in fleet.neurons)


def _load(m: ModelView) -> dict[str, Any] | None:
    if m.state != "LOADING":
        return None
    return {
        "stage": m.load_stage,
        "unit": m.load_unit,
        "done": m.load_done,
        "total": m.load_total,
        "percent": round(100 * m.load_done / m.load_total, 1) if m.load_total else None,
    }


def _pinned(catalogue: Catalogue, model_id: str) -> bool:
    entry = catalogue.find(model_id)
    return entry is not None and entry.pinned


def _byte_unit(n: int) -> tuple[float, str]:
    for scale, name in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return scale, name
    return 1.0, "B"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f}GiB"
