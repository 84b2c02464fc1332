"""Who may call cortex: API keys (inline, in a file re-read on SIGHUP), per-key limits, and the
loopback-only bind without keys; real cortex processes over the shared real neuron."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import (
    DEMO_ID,
    CortexProcess,
    NeuronProcess,
    catalogue_model,
    cortex_config,
    free_port,
    metric_value,
)

INVALID_KEY = {
    "type": "invalid_request_error",
    "param": None,
    "code": "invalid_api_key",
}


def _chat(max_tokens: int = 4, stream: bool = False) -> dict[str, Any]:
    return {
        "model": DEMO_ID,
        "messages": [{"role": "user", "content": "Write a long story about a cat and a dog."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _get_models(cortex: CortexProcess, headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(cortex.api_url + "/models", headers=headers) as r:
            return r.status, await r.json(), r.headers


async def _open_stream(
    session: aiohttp.ClientSession, cortex: CortexProcess, key: str
) -> tuple[aiohttp.ClientResponse, bytes]:
    """A long stream, open with its first event read: (the response, that event)."""
    stream = await session.post(
        cortex.api_url + "/chat/completions",
        json=_chat(max_tokens=200, stream=True),
        headers=_bearer(key),
    )
    assert stream.status == 200
    first = await stream.content.readline()
    assert first.startswith(b"data: ")
    return stream, first


async def _start(
    neuron: NeuronProcess, workdir: Path, listen: str | None = None, **auth: Any
) -> CortexProcess:
    await neuron.wait_serving()
    config = cortex_config([neuron], auth=auth)
    if listen is not None:
        config["listen"] = listen
    process = CortexProcess(workdir, config, models=[catalogue_model(DEMO_ID)]).start()
    await process.wait_ready()
    return process


@pytest.fixture
async def keyed(shared_neuron: NeuronProcess, tmp_path: Path) -> AsyncIterator[CortexProcess]:
    """cortex with one inline key and a keys file of one key."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("# clients\n\nfile-key-alpha\n")
    process = await _start(
        shared_neuron, tmp_path / "cortex", keys=["inline-key-1"], keys_file=str(keys_file)
    )
    try:
        yield process
    finally:
        process.stop()


async def test_v1_needs_a_known_key_in_bearer_or_x_api_key_and_probes_need_none(
    keyed: CortexProcess,
) -> None:
    for headers in ({}, _bearer("wrong-key-zz"), {"x-api-key": "wrong-key-zz"}, _bearer("")):
        status, body, _ = await _get_models(keyed, headers)
        assert status == 401, headers
        assert body["error"] | INVALID_KEY == body["error"] and body["error"]["message"]
    async with aiohttp.ClientSession() as session:
        # An unknown /v1 route is refused the same way: no key, no map of the API.
        async with session.get(keyed.api_url + "/nowhere") as r:
            assert r.status == 401
        async with session.post(keyed.api_url + "/chat/completions", json=_chat()) as r:
            assert r.status == 401
        for path in ("/health", "/ready"):
            async with session.get(keyed.url + path) as r:
                assert r.status == 200, path
        for headers in (_bearer("inline-key-1"), _bearer("file-key-alpha")):
            async with session.post(
                keyed.api_url + "/chat/completions", json=_chat(), headers=headers
            ) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["message"]["content"]
    status, body, _ = await _get_models(keyed, {"x-api-key": "file-key-alpha"})
    assert status == 200 and [m["id"] for m in body["data"]] == [DEMO_ID]
    text = keyed.metrics()
    assert metric_value(text, "helexa_gateway_rejections_total", reason="invalid_api_key") >= 5
    log = keyed.log()
    assert "keys=2" in log or "api_keys=2" in log
    for secret in ("inline-key-1", "file-key-alpha", "wrong-key-zz"):
        assert secret not in log and secret not in text


async def test_sighup_rereads_the_keys_file_and_an_open_stream_finishes(
    keyed: CortexProcess, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    async with aiohttp.ClientSession() as session:
        stream, first = await _open_stream(session, keyed, "file-key-alpha")

        keys_file.write_text("file-key-beta\n# alpha was revoked\n")
        keyed.send(signal.SIGHUP)
        await keyed.wait_log("api keys reloaded keys=2")  # beta and the inline key
        assert (await _get_models(keyed, _bearer("file-key-beta")))[0] == 200
        assert (await _get_models(keyed, _bearer("file-key-alpha")))[0] == 401
        assert (await _get_models(keyed, _bearer("inline-key-1")))[0] == 200
        # The stream begun with the revoked key was still running across the reload.
        gauge = metric_value(keyed.metrics(), "helexa_gateway_requests_in_flight", neuron="n0")
        assert gauge == 1

        # A file that cannot be used keeps the keys in use.
        keys_file.write_text("# nothing here\n")
        keyed.send(signal.SIGHUP)
        await keyed.wait_log("api keys not reloaded, keeping keys=2")
        keys_file.unlink()
        keyed.send(signal.SIGHUP)
        await keyed.wait_log("cannot read")
        assert (await _get_models(keyed, _bearer("file-key-beta")))[0] == 200

        rest = await stream.content.read()
        stream.close()
    events = [e for e in (first + rest).split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    assert all(b'"error"' not in e for e in events)
    assert b'"finish_reason"' in events[-2]
    assert keyed.proc is not None and keyed.proc.poll() is None
    assert "file-key-beta" not in keyed.log()


@pytest.fixture
async def limited(shared_neuron: NeuronProcess, tmp_path: Path) -> AsyncIterator[CortexProcess]:
    process = await _start(
        shared_neuron,
        tmp_path,
        keys=["key-c", "key-d", "key-r"],
        max_concurrent=1,
        requests_per_minute=3,
    )
    try:
        yield process
    finally:
        process.stop()


async def _until_admitted(cortex: CortexProcess, key: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while (status := (await _get_models(cortex, _bearer(key)))[0]) == 429:
        assert time.monotonic() < deadline, "the key's slot was never freed"
    assert status == 200


async def test_a_stream_holds_its_keys_concurrency_slot_until_the_client_leaves(
    limited: CortexProcess,
) -> None:
    async with aiohttp.ClientSession() as session:
        stream, _ = await _open_stream(session, limited, "key-c")
        status, body, headers = await _get_models(limited, _bearer("key-c"))
        assert status == 429
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert body["error"]["param"] is None and "max_concurrent=1" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        # The limit is per key: another key is served meanwhile.
        assert (await _get_models(limited, _bearer("key-d")))[0] == 200
        stream.close()  # the client goes away mid-stream
    await _until_admitted(limited, "key-c")
    text = limited.metrics()
    assert metric_value(text, "helexa_gateway_rejections_total", reason="key_concurrency") >= 1
    assert "key-c" not in text and "key-c" not in limited.log()


async def test_requests_per_minute_is_per_key_with_a_computed_retry_after(
    limited: CortexProcess,
) -> None:
    for _ in range(3):
        assert (await _get_models(limited, _bearer("key-r")))[0] == 200
    status, body, headers = await _get_models(limited, _bearer("key-r"))
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    assert "requests_per_minute=3" in body["error"]["message"]
    # Seconds until the first of the three leaves the 60 s window.
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert (await _get_models(limited, _bearer("key-d")))[0] == 200
    text = limited.metrics()
    assert metric_value(text, "helexa_gateway_rejections_total", reason="key_rate_limit") >= 1


def _listening_on(port: int) -> set[str]:
    """The IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, _, hex_port = fields[1].partition(":")
        if fields[3] == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.mark.parametrize("allow", [False, True], ids=["keyless-loopback", "allowed"])
async def test_without_keys_the_api_binds_loopback_unless_allowed(
    shared_neuron: NeuronProcess, tmp_path: Path, allow: bool
) -> None:
    port = free_port()
    process = await _start(
        shared_neuron, tmp_path, listen=f"0.0.0.0:{port}", allow_unauthenticated=allow
    )
    try:
        assert _listening_on(port) == ({"0.0.0.0"} if allow else {"127.0.0.1"})
        log = process.log()
        assert "allow_unauthenticated" in log and "WARNING" in log
        if not allow:
            assert "listening on 127.0.0.1 instead of listen=0.0.0.0" in log
        assert (await _get_models(process, {}))[0] == 200
    finally:
        process.stop()


async def test_without_keys_on_loopback_the_log_says_the_api_is_open_to_this_host(
    shared_neuron: NeuronProcess, tmp_path: Path
) -> None:
    process = await _start(shared_neuron, tmp_path)  # listens on 127.0.0.1, as `make run` does
    try:
        assert "no API keys: the API takes requests without a key" in process.log()
        assert "api_keys=none" in process.log() and "WARNING" not in process.log()
        assert (await _get_models(process, {}))[0] == 200
    finally:
        process.stop()


async def test_a_key_limited_to_models_sees_and_places_no_other(
    shared_neuron: NeuronProcess, tmp_path: Path
) -> None:
    await shared_neuron.wait_serving()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"file-key-smol {DEMO_ID}\n")
    config = cortex_config(
        [shared_neuron], auth={"keys": ["inline-key-all", "inline-key-none nothing-here"]}
    )
    config["auth"]["keys_file"] = str(keys_file)
    process = CortexProcess(
        tmp_path / "cortex",
        config,
        # "elsewhere" would be placed (loaded) on the neuron by a request for it.
        models=[catalogue_model(DEMO_ID), catalogue_model("elsewhere", dtype="bfloat16")],
    ).start()
    try:
        await process.wait_ready()
        listed = {}
        for key in ("inline-key-all", "file-key-smol", "inline-key-none"):
            status, body, _ = await _get_models(process, _bearer(key))
            assert status == 200
            listed[key] = {m["id"] for m in body["data"]}
        assert listed == {
            "inline-key-all": {DEMO_ID, "elsewhere"},
            "file-key-smol": {DEMO_ID},
            "inline-key-none": set(),
        }
        async with aiohttp.ClientSession() as session:
            body = {**_chat(), "model": "elsewhere"}
            async with session.post(
                process.api_url + "/chat/completions", json=body, headers=_bearer("file-key-smol")
            ) as r:
                assert r.status == 404
                assert "may not use it" in (await r.json())["error"]["message"]
            async with session.get(
                process.api_url + "/models/elsewhere", headers=_bearer("file-key-smol")
            ) as r:
                assert r.status == 404
            async with session.post(
                process.api_url + "/chat/completions",
                json=_chat(),
                headers=_bearer("file-key-smol"),
            ) as r:
                assert r.status == 200
        async with grpc.aio.insecure_channel(shared_neuron.endpoint) as channel:
            held = await pb_grpc.NeuronStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        assert "elsewhere" not in {m.id for m in held.models}  # never placed
    finally:
        process.stop()
