"""The admin API (/admin/v1) and the CLI commands on it, against a real cortex process: in front
of scripted neurons (drain, keys, the catalogue, the CLI's drain) and of a real neuron with the
demo model and a small memory budget (load, unload, pin, a model that does not fit)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import tomli_w

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import (
    ROOT,
    CortexProcess,
    NeuronProcess,
    catalogue_model,
    cortex_config,
    free_port,
    neuron_config,
    until,
)
from tests.test_cortex_streaming import MODEL, ScriptedNeuron, in_front_of

USER_KEY = "user-key-0123456789abcdef"
ALICE_KEY = "alice-admin-key-4f1c9e2b7a"
BOB_KEY = "bob-admin-key-8d3a6c0e5f"
CAROL_KEY = "carol-admin-key-1b7e4d9a2c"
KEYS = (USER_KEY, ALICE_KEY, BOB_KEY, CAROL_KEY)


def _config(neurons: list[Any], tmp_path: Path, **more: Any) -> dict[str, Any]:
    keys_file = tmp_path / "admin-keys"
    keys_file.write_text(f"# admins\nops-bob {BOB_KEY}\n")
    return cortex_config(
        neurons,
        auth={"keys": [USER_KEY]},
        admin={"keys": [f"ops-alice {ALICE_KEY}"], "keys_file": str(keys_file)},
        **more,
    )


async def _admin(
    cortex: CortexProcess, method: str, path: str, key: str | None = ALICE_KEY
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, cortex.url + "/admin/v1" + path, headers=headers) as r:
            return r.status, await r.json()


async def _neuron_view(cortex: CortexProcess, name: str) -> dict[str, Any]:
    status, fleet = await _admin(cortex, "GET", "/fleet")
    assert status == 200, fleet
    return next(n for n in fleet["neurons"] if n["name"] == name)


async def _chat(cortex: CortexProcess, cue: str, stream: bool = False) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": cue}], "stream": stream}
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            cortex.url + "/v1/chat/completions", json=body, headers=headers
        ) as r:
            assert r.status == 200, await r.text()
            if not stream:
                return str((await r.json())["choices"][0]["message"]["content"])
            text = ""
            async for line in r.content:
                if line.startswith(b"data: {"):
                    for choice in json.loads(line[len(b"data: ") :])["choices"]:
                        text += choice["delta"].get("content") or ""
            return text


async def _cli(*args: str, key: str | None = None) -> tuple[int, str, str]:
    """``cortex ARGS`` from the source tree, run to its end without blocking the loop (the
    scripted neurons answer on it)."""
    env = {**os.environ}
    env.pop("HELEXA_ADMIN_KEY", None)
    env.pop("HELEXA_CORTEX_URL", None)
    if key is not None:
        env["HELEXA_ADMIN_KEY"] = key
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cortex.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def scripted(
    tmp_path: Path,
) -> AsyncIterator[tuple[CortexProcess, list[ScriptedNeuron]]]:
    neurons = [await ScriptedNeuron().start(), await ScriptedNeuron().start()]
    cortex = CortexProcess(tmp_path, _config(neurons, tmp_path, names=["a", "b"]))
    async with in_front_of(cortex, neurons):
        yield cortex, neurons


def _valid(body: Any, schema: str) -> None:
    """``body`` is what /openapi.json says the answer is."""
    from cortex.api.openapi import DOCUMENT

    ref = {"$ref": f"#/components/schemas/{schema}", "components": DOCUMENT["components"]}
    jsonschema.validate(body, ref)


def _assert_no_key_logged(cortex: CortexProcess) -> None:
    log = cortex.log()
    for key in KEYS:
        assert key not in log


# ---- keys ----


async def test_admin_api_refuses_user_keys_and_unknown_keys_and_accepts_admin_keys(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    cortex, _ = scripted
    status, body = await _admin(cortex, "POST", "/neurons/a/drain", key=USER_KEY)
    assert status == 403
    assert body["error"]["code"] == "admin_key_required"
    assert body["error"]["type"] == "permission_error"
    status, body = await _admin(cortex, "GET", "/fleet", key=USER_KEY)
    assert status == 403
    for key in (None, "not-a-key-at-all"):
        status, body = await _admin(cortex, "GET", "/fleet", key=key)
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key"
    # Nothing was done by the refused drain; the keys file's admin is an admin too.
    assert (await _neuron_view(cortex, "a"))["drained"] is False
    status, _ = await _admin(cortex, "GET", "/fleet", key=BOB_KEY)
    assert status == 200
    # An admin key is no API key: the two sets are apart.
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {ALICE_KEY}"}
        async with session.get(cortex.api_url + "/models", headers=headers) as r:
            assert r.status == 401
    # SIGHUP re-reads the admin keys file: a key added works, a key removed fails.
    (cortex.workdir / "admin-keys").write_text(f"ops-carol {CAROL_KEY}\n")
    cortex.send(signal.SIGHUP)
    await cortex.wait_log("admin keys reloaded keys=2")
    assert (await _admin(cortex, "GET", "/fleet", key=CAROL_KEY))[0] == 200
    assert (await _admin(cortex, "GET", "/fleet", key=BOB_KEY))[0] == 401
    assert (await _admin(cortex, "GET", "/fleet", key=ALICE_KEY))[0] == 200


async def test_unknown_neuron_and_unknown_model_are_404s(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    cortex, _ = scripted
    for path in ("/neurons/nope/drain", "/neurons/nope/undrain", "/neurons/nope/models/x/load"):
        status, body = await _admin(cortex, "POST", path)
        assert status == 404, path
        assert body["error"]["code"] == "neuron_not_found"
        assert "nope" in body["error"]["message"]
    for action in ("load", "unload", "pin", "unpin"):
        status, body = await _admin(cortex, "POST", f"/neurons/a/models/no-such-model/{action}")
        assert status == 404, action
        assert body["error"]["code"] == "model_not_found"
        assert "no-such-model" in body["error"]["message"]


# ---- drain ----


async def test_drain_sends_new_requests_elsewhere_lets_open_streams_finish_and_undrain_restores(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    cortex, (a, b) = scripted
    # Both idle: the tie goes to "a", so the long stream is there.
    tick = asyncio.create_task(_chat(cortex, "tick", stream=True))
    await until(lambda: "tick" in a.calls, 30, "the stream did not reach neuron a")
    status, view = await _admin(cortex, "POST", "/neurons/a/drain")
    assert status == 200, view
    assert view["drained"] is True and view["status"] == "up"
    assert view["in_flight"] == 1
    before_a = len(a.calls)
    for _ in range(6):
        assert await _chat(cortex, "hi") == "Hello world"
    assert len(a.calls) == before_a  # none of them went to the drained neuron
    assert b.calls.count("hi") == 6
    assert not tick.done()  # still streaming on the drained neuron...
    assert await tick == "t" * 150 + "Hello world"  # ...and it finished whole
    assert not a.cancelled
    status, fleet = await _admin(cortex, "GET", "/fleet")
    _valid(fleet, "AdminFleet")
    assert [n["drained"] for n in fleet["neurons"]] == [True, False]
    assert fleet["routable"] == 1 and fleet["up"] == 2
    assert (await _admin(cortex, "POST", "/neurons/a/undrain"))[0] == 200
    assert await _chat(cortex, "again") == "Hello world"
    assert a.calls[-1] == "again"  # idle tie: "a" takes requests again
    await cortex.wait_log("admin action=undrain admin=ops-alice neuron=a")
    assert "admin action=drain admin=ops-alice neuron=a was_drained=False in_flight=1" in (
        cortex.log()
    )
    _assert_no_key_logged(cortex)


async def test_cli_drain_and_undrain_a_running_cortex(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    cortex, _ = scripted
    code, out, err = await _cli("drain", "b", "--url", cortex.url, key=BOB_KEY)
    assert code == 0, err
    assert out.startswith("neuron b drained")
    assert (await _neuron_view(cortex, "b"))["drained"] is True
    # `cortex status` shows the fleet view (the key and address from cortex.toml alone:
    # [admin] keys' first, listen); `--direct` polls the neurons: the same facts, less what
    # only the running cortex knows.
    code, out, err = await _cli("status", "--config", str(cortex.config_path))
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines if line[:2] in ("a ", "b ")] == [
        ["a", "up"],
        ["b", "drained"],
    ], lines
    assert lines[-1] == "2 of 2 neurons up, 1 taking requests", lines
    code, out, err = await _cli("status", "--json", "--config", str(cortex.config_path))
    assert code == 0, err
    status, fleet = await _admin(cortex, "GET", "/fleet")
    assert status == 200, fleet
    shown = json.loads(out)
    assert [n["drained"] for n in shown["neurons"]] == [False, True]
    code, out, err = await _cli("status", "--direct", "--json", "--config", str(cortex.config_path))
    assert code == 0, err
    polled = json.loads(out)
    assert shown["total"] == polled["total"] == fleet["total"] == 2
    for direct, view in zip(polled["neurons"], shown["neurons"], strict=True):
        assert "drained" not in direct and "in_flight" not in direct
        assert {k: view[k] for k in direct if k != "models"} == {
            k: v for k, v in direct.items() if k != "models"
        }
        assert direct["models"] and len(direct["models"]) == len(view["models"])
        for model, in_view in zip(direct["models"], view["models"], strict=True):
            assert {k: in_view[k] for k in model} == model
    code, out, err = await _cli("undrain", "b", "--config", str(cortex.config_path))
    assert code == 0, err
    assert out.startswith("neuron b undrained")
    assert (await _neuron_view(cortex, "b"))["drained"] is False
    # Asked with a user key, the fleet view is refused: the status says so, and fails.
    code, out, err = await _cli("status", "--url", cortex.url, key=USER_KEY)
    assert code == 1 and not out and "403 admin_key_required" in err, err
    code, out, err = await _cli("drain", "nope", "--url", cortex.url, key=ALICE_KEY)
    assert code == 1 and not out
    assert "404 neuron_not_found" in err and "nope" in err
    code, out, err = await _cli("drain", "a", "--url", cortex.url, key=USER_KEY)
    assert code == 1
    assert "403 admin_key_required" in err
    assert USER_KEY not in out + err
    assert (await _neuron_view(cortex, "a"))["drained"] is False
    nobody = f"http://127.0.0.1:{free_port()}"
    code, out, err = await _cli("drain", "a", "--url", nobody, key=ALICE_KEY)
    assert code == 1 and f"cannot reach {nobody}" in err
    code, _, err = await _cli("drain", "a", "--config", str(cortex.workdir / "missing.toml"))
    assert code == 2 and "missing.toml" in err
    await cortex.wait_log("admin action=drain admin=ops-bob neuron=b")
    _assert_no_key_logged(cortex)


# ---- the catalogue ----


async def test_catalogue_reload_picks_up_an_edited_models_toml_and_keeps_it_on_a_bad_one(
    scripted: tuple[CortexProcess, list[ScriptedNeuron]],
) -> None:
    cortex, _ = scripted
    models = cortex.workdir / "models.toml"
    models.write_text(tomli_w.dumps({"models": [catalogue_model("added-model")]}))
    status, body = await _admin(cortex, "POST", "/catalogue/reload")
    assert status == 200, body
    _valid(body, "AdminCatalogue")
    assert body == {
        "models": ["added-model"], "added": ["added-model"], "removed": [], "changed": [],
    }  # fmt: skip
    models.write_text(tomli_w.dumps({"models": [catalogue_model("added-model", pinned=True)]}))
    status, body = await _admin(cortex, "POST", "/catalogue/reload")
    assert (status, body["added"], body["changed"]) == (200, [], ["added-model"])
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(cortex.api_url + "/models", headers=headers) as r:
            listed = [m["id"] for m in (await r.json())["data"]]
    assert "added-model" in listed
    models.write_text(tomli_w.dumps({"models": [{"id": "x", "unknown_key": 1}]}))
    status, body = await _admin(cortex, "POST", "/catalogue/reload")
    assert status == 422
    assert body["error"]["code"] == "catalogue_invalid"
    assert "unknown_key" in body["error"]["message"]
    status, fleet = await _admin(cortex, "GET", "/fleet")
    assert fleet["catalogue"] == ["added-model"]  # the one in use stays
    await cortex.wait_log("admin action=reload_catalogue admin=ops-alice models=1")


# ---- models, on a real neuron ----


@pytest.fixture
async def real(tmp_path: Path) -> AsyncIterator[tuple[CortexProcess, NeuronProcess]]:
    # 1 GiB: the demo model with a small context and batch fits; at its full context and the
    # default batch of 16, its KV cache does not (the neuron refuses it).
    neuron = NeuronProcess(tmp_path / "neuron", neuron_config(cpu_memory_budget="1GiB")).start()
    cortex = None
    try:
        await neuron.wait_serving()
        cortex = CortexProcess(
            tmp_path / "cortex",
            _config([neuron], tmp_path),
            models=[
                catalogue_model("small", max_context=512, max_batch_size=2),
                catalogue_model("full"),
                catalogue_model("huge", memory="100GiB"),
            ],
        ).start()
        await cortex.wait_ready()
        yield cortex, neuron
    finally:
        if cortex is not None:
            cortex.stop()
        neuron.stop()


async def _listed(neuron: NeuronProcess) -> dict[str, str]:
    async with neuron.channel() as channel:
        reply = await pb_grpc.NeuronStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    return {m.id: pb.ModelState.Name(m.state) for m in reply.models}


async def test_load_pin_unload_through_the_api_and_a_model_that_does_not_fit_is_a_409(
    real: tuple[CortexProcess, NeuronProcess],
) -> None:
    cortex, neuron = real
    status, body = await _admin(cortex, "POST", "/neurons/n0/models/small/load")
    assert status == 200, body
    _valid(body, "AdminLoaded")
    assert body["already_loaded"] is False and body["model"]["state"] == "READY"
    assert await _listed(neuron) == {"small": "MODEL_STATE_READY"}
    models = (await _neuron_view(cortex, "n0"))["models"]
    assert [(m["id"], m["state"], m["pinned"]) for m in models] == [("small", "READY", False)]
    status, body = await _admin(cortex, "POST", "/neurons/n0/models/small/load")
    assert status == 200 and body["already_loaded"] is True

    status, body = await _admin(cortex, "POST", "/neurons/n0/models/small/pin")
    assert status == 200 and body["pinned"] is True
    assert (await _neuron_view(cortex, "n0"))["models"][0]["pinned"] is True
    status, body = await _admin(cortex, "POST", "/neurons/n0/models/small/unpin")
    assert status == 200 and body["pinned"] is False
    assert (await _neuron_view(cortex, "n0"))["models"][0]["pinned"] is False
    status, body = await _admin(cortex, "POST", "/neurons/n0/models/full/pin")
    assert status == 409 and "load it first" in body["error"]["message"]

    # The neuron refuses it (its KV cache does not fit the budget): a 409 with its reason,
    # and nothing left behind on the neuron.
    status, body = await _admin(cortex, "POST", "/neurons/n0/models/full/load")
    assert status == 409, body
    _valid(body, "Error")
    assert body["error"]["code"] == "conflict"
    assert "no room for 'full'" in body["error"]["message"]
    assert await _listed(neuron) == {"small": "MODEL_STATE_READY"}
    # cortex knows this one cannot fit before asking.
    status, body = await _admin(cortex, "POST", "/neurons/n0/models/huge/load")
    assert status == 409
    assert "needs 107374182400 bytes" in body["error"]["message"]
    assert await _listed(neuron) == {"small": "MODEL_STATE_READY"}
    assert [m["id"] for m in (await _neuron_view(cortex, "n0"))["models"]] == ["small"]

    status, body = await _admin(cortex, "POST", "/neurons/n0/models/small/unload")
    assert status == 200, body
    _valid(body, "AdminUnloaded")
    assert body["was_loaded"] is True and body["freed_bytes"] > 0
    assert await _listed(neuron) == {}
    assert (await _neuron_view(cortex, "n0"))["models"] == []
    log = cortex.log()
    for action in ("load", "pin", "unpin", "unload"):
        assert f"admin action={action} admin=ops-alice neuron=n0 model=small" in log
    _assert_no_key_logged(cortex)


async def test_cli_load_and_unload_on_a_real_neuron(
    real: tuple[CortexProcess, NeuronProcess],
) -> None:
    cortex, neuron = real
    config = str(cortex.config_path)
    code, out, err = await _cli("load", "small", "--neuron", "n0", "--config", config)
    assert code == 0, err
    assert out.startswith("model small loaded on neuron n0: READY on cpu")
    assert await _listed(neuron) == {"small": "MODEL_STATE_READY"}
    code, out, err = await _cli("load", "full", "--neuron", "n0", "--config", config)
    assert code == 1 and not out
    assert "409 conflict" in err and "no room for 'full'" in err
    code, out, err = await _cli("pin", "small", "--neuron", "n0", "--config", config)
    assert code == 0 and out.startswith("model small pinned on neuron n0"), err
    code, out, err = await _cli("unload", "small", "--neuron", "n0", "--config", config)
    assert code == 0, err
    assert out.startswith("model small unloaded from neuron n0")
    assert await _listed(neuron) == {}
    code, out, err = await _cli("unload", "small", "--neuron", "nope", "--config", config)
    assert code == 1 and "404 neuron_not_found" in err
    _assert_no_key_logged(cortex)
