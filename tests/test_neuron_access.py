"""cortex ↔ neuron access: the neuron's token (UNAUTHENTICATED without it, health exempt), TLS and
mTLS with certificates made here, and what the metrics ports never show. Real neuron and cortex
processes, real gRPC over real sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest
import tomli_w
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cortex.neuronlink import Link
from helexa.configfile import ConfigError
from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from neuron.auth import Access
from neuron.config import load
from tests.certs import Pair, issue, make_ca
from tests.harness import (
    DEMO_ID,
    ROOT,
    CortexProcess,
    Many,
    NeuronProcess,
    catalogue_model,
    chat,
    collect,
    cortex_config,
    demo_model,
    free_port,
    metric_value,
    neuron_config,
    run_cli,
)

TOKEN = "neuron-token-5f2a9c"
API_KEY = "api-key-secret-81d3"
# A prompt no metric or log line has any business showing.
PROMPT = "Say hello to the zebra-quokka-7731."
MARK = "zebra-quokka-7731"


async def _neuron(workdir: Path, link: Link, **top: Any) -> NeuronProcess:
    neuron = NeuronProcess(workdir, neuron_config([demo_model()], **top), link=link).start()
    try:
        await neuron.wait_serving()
    except BaseException:
        neuron.stop()
        raise
    return neuron


async def _cortex(neuron: NeuronProcess, workdir: Path, **neuron_keys: Any) -> CortexProcess:
    """cortex over ``neuron`` with ``neuron_keys`` in its [[neurons]] entry, up to /health."""
    config = cortex_config([neuron])
    config["neurons"][0].update(neuron_keys)
    process = CortexProcess(workdir, config, models=[catalogue_model(DEMO_ID)]).start()
    await process.wait_ready(path="/health")
    return process


async def _chat_status(cortex: CortexProcess) -> tuple[int, Any]:
    body = {"model": DEMO_ID, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    async with aiohttp.ClientSession() as session:
        async with session.post(cortex.api_url + "/chat/completions", json=body) as r:
            return r.status, await r.json()


async def _assert_refused(cortex: CortexProcess, neuron: NeuronProcess) -> None:
    """The neuron is down for cortex, requests fail with an envelope, both processes live."""
    async with aiohttp.ClientSession() as session:
        async with session.get(cortex.url + "/ready") as r:
            assert r.status == 503
    status, body = await _chat_status(cortex)
    assert status == 503 and body["error"]["code"] == "no_capacity", body
    assert "neuron down neuron=n0" in cortex.log()
    assert cortex.proc is not None and cortex.proc.poll() is None
    await neuron.wait_serving(within=10)


async def _assert_status_sees_it_up(cortex: CortexProcess) -> None:
    """``cortex status --direct`` with the same config dials the neuron as ``cortex serve``
    does."""
    done = await asyncio.to_thread(run_cli, "cortex", "status", cortex.config_path, "--direct")
    assert done.returncode == 0 and "1 of 1 neurons up" in done.stdout, done.stdout + done.stderr


# ---- the token ----


@pytest.fixture(scope="module")
async def token_neuron(
    demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NeuronProcess]:
    workdir = tmp_path_factory.mktemp("token-neuron")
    (workdir / "token").write_text(f"# shared with cortex\n{TOKEN}\n")
    neuron = await _neuron(workdir, Link(token=TOKEN), auth={"token_file": str(workdir / "token")})
    try:
        yield neuron
    finally:
        neuron.stop()


async def _many(stub: pb_grpc.NeuronStub) -> None:
    # Refused as it opens, before any request is written.
    await Many(stub).read_until(lambda: False)


@pytest.mark.parametrize("token", ["", "wrong-token-77"], ids=["no-token", "wrong-token"])
async def test_neuron_refuses_every_call_without_its_token_but_answers_health(
    token_neuron: NeuronProcess, token: str
) -> None:
    async with token_neuron.channel(Link(token=token)) as channel:
        stub = pb_grpc.NeuronStub(channel)
        for call in (
            stub.Info(pb.InfoRequest(), timeout=10),
            stub.ListModels(pb.ListModelsRequest(), timeout=10),
            collect(stub, chat(DEMO_ID, PROMPT, max_tokens=4)),
            _many(stub),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN not in (refused.value.details() or "")
        # Probes ask health without credentials.
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_neuron_serves_a_caller_with_its_token(token_neuron: NeuronProcess) -> None:
    async with token_neuron.channel() as channel:
        stub = pb_grpc.NeuronStub(channel)
        info = await stub.Info(pb.InfoRequest(), timeout=10)
        assert info.devices
        text, last, _ = await collect(stub, chat(DEMO_ID, "What is 2+2?", max_tokens=4))
        assert text and last.usage.completion_tokens > 0
    assert "token=required" in token_neuron.log()
    assert TOKEN not in token_neuron.log()


async def test_cortex_with_the_token_serves_chat_and_no_secret_or_prompt_reaches_metrics(
    token_neuron: NeuronProcess, tmp_path: Path
) -> None:
    (tmp_path / "neuron-token").write_text(TOKEN + "\n")
    (tmp_path / "api-keys").write_text(API_KEY + "\n")
    config = cortex_config([token_neuron], auth={"keys_file": str(tmp_path / "api-keys")})
    config["neurons"][0]["token_file"] = str(tmp_path / "neuron-token")
    cortex = CortexProcess(tmp_path, config, models=[catalogue_model(DEMO_ID)]).start()
    try:
        await cortex.wait_ready()
        client = openai.AsyncOpenAI(base_url=cortex.api_url, api_key=API_KEY, max_retries=0)
        reply = await client.chat.completions.create(
            model=DEMO_ID, messages=[{"role": "user", "content": PROMPT}], max_tokens=8
        )
        assert reply.choices[0].message.content
        stream = await client.chat.completions.create(
            model=DEMO_ID,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=8,
            stream=True,
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(
                base_url=cortex.api_url, api_key=TOKEN, max_retries=0
            ).models.list()
        await client.close()

        await _assert_status_sees_it_up(cortex)

        scraped = {"cortex": cortex.metrics(), "neuron": token_neuron.metrics()}
        assert "helexa_gateway_requests_total" in scraped["cortex"]
        assert "helexa_neuron_requests_total" in scraped["neuron"]
        logs = {"cortex log": cortex.log(), "neuron log": token_neuron.log()}
        for where, text in (scraped | logs).items():
            for secret in (TOKEN, API_KEY, MARK):
                assert secret not in text, f"{secret!r} in {where}"
    finally:
        cortex.stop()


async def test_cortex_without_the_token_sees_the_neuron_down_and_answers_503(
    token_neuron: NeuronProcess, tmp_path: Path
) -> None:
    cortex = await _cortex(token_neuron, tmp_path)
    try:
        await _assert_refused(cortex, token_neuron)
        assert "UNAUTHENTICATED" in cortex.log()
    finally:
        cortex.stop()


# ---- beyond loopback ----


def _access(workdir: Path, **top: Any) -> Access:
    """``Access.load`` of a config written as ``neuron serve`` would read it."""
    path = workdir / "neuron.toml"
    path.write_text(tomli_w.dumps(neuron_config(**top)))
    return Access.load(load(path))


@pytest.mark.parametrize("listen", ["0.0.0.0", "[::]", "192.0.2.7"])
def test_a_neuron_beyond_loopback_without_token_or_mtls_is_refused_naming_the_key(
    tmp_path: Path, pki: dict[str, Pair], listen: str
) -> None:
    tls = {"cert_file": str(pki["neuron"].cert), "key_file": str(pki["neuron"].key)}
    for secured in ({}, {"tls": tls}, {"auth": {"allow_unauthenticated": False}}):
        with pytest.raises(ConfigError) as refused:
            _access(tmp_path, listen=f"{listen}:13131", **secured)
        assert "auth.allow_unauthenticated = true" in str(refused.value)
        assert f"listen: {listen}:13131 is beyond loopback" in str(refused.value)
    (tmp_path / "token").write_text(TOKEN + "\n")
    for allowed in (
        {"auth": {"token_file": str(tmp_path / "token")}},
        {"tls": {**tls, "client_ca_file": str(pki["ca"].cert)}},
        {"auth": {"allow_unauthenticated": True}},
    ):
        _access(tmp_path, listen=f"{listen}:13131", **allowed)
    for loopback in ("127.0.0.1", "127.8.9.10", "[::1]", "localhost"):
        assert not _access(tmp_path, listen=f"{loopback}:13131").open_beyond_loopback(
            f"{loopback}:13131"
        )


def test_neuron_serve_and_check_config_refuse_an_open_neuron_before_loading_anything(
    tmp_path: Path,
) -> None:
    path = tmp_path / "neuron.toml"
    config = neuron_config([demo_model()], listen=f"0.0.0.0:{free_port()}")
    path.write_text(tomli_w.dumps(config))
    for command in ("serve", "check-config"):
        done = run_cli("neuron", command, path)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "auth.allow_unauthenticated" in done.stderr and "[auth] token" in done.stderr
        assert "model loaded" not in done.stdout + done.stderr
    example = ROOT / "configs/neuron.example.toml"  # what the package installs: refused too
    done = run_cli("neuron", "check-config", example)
    assert done.returncode == 2 and "auth.allow_unauthenticated" in done.stderr


async def test_an_allowed_open_neuron_serves_and_warns_in_its_log(
    tmp_path: Path, neurons: list[NeuronProcess]
) -> None:
    config = neuron_config(listen=f"0.0.0.0:{free_port()}", auth={"allow_unauthenticated": True})
    neurons.append(NeuronProcess(tmp_path, config).start())
    await neurons[-1].wait_serving()
    log = neurons[-1].log()
    assert "WARNING" in log and "auth.allow_unauthenticated = true: anyone who reaches" in log


# ---- TLS and mTLS ----


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    """Two CAs: ``ca`` signed the neuron's and cortex's certificates, ``other`` a rogue one."""
    directory = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(directory, "ca"), make_ca(directory, "other-ca")
    return {
        "ca": ca,
        "other": other,
        "neuron": issue(ca, "neuron"),
        "cortex": issue(ca, "cortex"),
        "rogue": issue(other, "rogue"),
    }


@pytest.fixture(scope="module")
async def mtls_neuron(
    demo_dir: Path, pki: dict[str, Pair], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NeuronProcess]:
    """A neuron on TLS that requires a client certificate signed by ``ca``."""
    link = Link(
        ca=pki["ca"].cert.read_bytes(),
        cert=pki["cortex"].cert.read_bytes(),
        key=pki["cortex"].key.read_bytes(),
    )
    tls = {
        "cert_file": str(pki["neuron"].cert),
        "key_file": str(pki["neuron"].key),
        "client_ca_file": str(pki["ca"].cert),
    }
    neuron = await _neuron(tmp_path_factory.mktemp("mtls-neuron"), link, tls=tls)
    try:
        yield neuron
    finally:
        neuron.stop()


async def test_cortex_over_mtls_serves_chat_with_fleet_wide_tls_settings(
    mtls_neuron: NeuronProcess, pki: dict[str, Pair], tmp_path: Path
) -> None:
    fleet = {
        "ca_file": str(pki["ca"].cert),
        "cert_file": str(pki["cortex"].cert),
        "key_file": str(pki["cortex"].key),
        "server_name": "localhost",  # a name in the neuron's certificate
    }
    cortex = CortexProcess(
        tmp_path, cortex_config([mtls_neuron], fleet=fleet), models=[catalogue_model(DEMO_ID)]
    ).start()
    try:
        await cortex.wait_ready()
        status, body = await _chat_status(cortex)
        assert status == 200 and body["choices"][0]["message"]["content"], body
        await _assert_status_sees_it_up(cortex)
    finally:
        cortex.stop()
    assert "tls=mtls" in mtls_neuron.log()


@pytest.mark.parametrize(
    "case", ["plaintext", "no-client-cert", "client-cert-of-another-ca", "trusts-another-ca"]
)
async def test_mtls_neuron_refuses_a_cortex_without_the_right_certificates(
    mtls_neuron: NeuronProcess, pki: dict[str, Pair], tmp_path: Path, case: str
) -> None:
    client = pki["rogue"] if case == "client-cert-of-another-ca" else pki["cortex"]
    keys = {
        "plaintext": {},
        "no-client-cert": {"ca_file": str(pki["ca"].cert)},
        "client-cert-of-another-ca": {"ca_file": str(pki["ca"].cert)},
        "trusts-another-ca": {"ca_file": str(pki["other"].cert)},
    }[case]
    if case in ("client-cert-of-another-ca", "trusts-another-ca"):
        keys |= {"cert_file": str(client.cert), "key_file": str(client.key)}
    cortex = await _cortex(mtls_neuron, tmp_path, **keys)
    try:
        await _assert_refused(cortex, mtls_neuron)
    finally:
        cortex.stop()


async def test_cortex_over_tls_with_its_own_token_and_ca_serves_and_a_disconnect_cancels_there(
    demo_dir: Path, pki: dict[str, Pair], neurons: list[NeuronProcess], tmp_path: Path
) -> None:
    """TLS without client certificates plus a token inline, set in the [[neurons]] entry."""
    tls = {"cert_file": str(pki["neuron"].cert), "key_file": str(pki["neuron"].key)}
    link = Link(token=TOKEN, ca=pki["ca"].cert.read_bytes())
    neurons.append(await _neuron(tmp_path / "neuron", link, auth={"token": TOKEN}, tls=tls))
    neuron = neurons[-1]
    assert "tls=on token=required" in neuron.log()
    (tmp_path / "token").write_text(TOKEN + "\n")
    cortex = await _cortex(
        neuron, tmp_path / "cortex", token_file=str(tmp_path / "token"), ca_file=str(pki["ca"].cert)
    )
    try:
        await cortex.wait_ready()
        status, body = await _chat_status(cortex)
        assert status == 200, body
        # A client that leaves mid-stream cancels the (intercepted) call on the neuron too.
        body = {
            "model": DEMO_ID,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 2000,
            "stream": True,
        }
        async with aiohttp.ClientSession() as session:
            async with session.post(cortex.api_url + "/chat/completions", json=body) as r:
                assert r.status == 200
                seen = 0
                async for line in r.content:
                    seen += line.startswith(b"data: {")
                    if seen >= 3:
                        break
        deadline = time.monotonic() + 60
        while not metric_value(
            neuron.metrics(), "helexa_neuron_requests_total", finish_reason="cancelled"
        ):
            assert time.monotonic() < deadline, "the neuron never saw the generation cancelled"
            await asyncio.sleep(0.1)
        assert not metric_value(neuron.metrics(), "helexa_neuron_requests_running", model=DEMO_ID)
    finally:
        cortex.stop()
