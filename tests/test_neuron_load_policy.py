"""What LoadModel may make a neuron read or fetch: local paths only under the allowed
directories (one answer whether a path exists or not), Hugging Face repositories only on the
allow-list, a download refused before any file is fetched when it cannot fit, and FAILED
entries forgotten after ``loading.failed_ttl``.

The Hub is unreachable here: a real neuron process is pointed (``HF_ENDPOINT``) at a small
HTTP server on a real socket (``tests.hubstub``) that answers the Hub's model-info API with the
sizes a test chooses and counts every request, downloads included (none is served).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from helexa.modelspec import ModelSpec
from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from neuron.errors import NoRoom, NotAllowed
from neuron.loadpolicy import SHOWN, check_download_fits, check_source
from tests.harness import NeuronProcess, neuron_config
from tests.hubstub import HubStub

TB = 10**12
SHA = "5" * 64  # the LFS sha256 of the one weights file the stub lists
REFUSED_PATH = "not under cache_dir or a directory in loading.local_dirs"


def _weights(size: int, name: str = "model.safetensors") -> list[dict[str, Any]]:
    return [
        {"rfilename": "config.json", "size": 700, "blobId": "c" * 40},
        {"rfilename": "README.md", "size": 10 * TB, "blobId": "d" * 40},  # not fetched
        {
            "rfilename": name,
            "size": size,
            "blobId": "e" * 40,
            "lfs": {"sha256": SHA, "size": size, "pointerSize": 134},
        },
    ]


@pytest.fixture(scope="module")
def hub() -> Iterator[HubStub]:
    stub = HubStub(
        {
            # More than any disk here: refused by the disk check.
            "helexa-test/huge": _weights(1000 * TB),
            "helexa-test/huge-gguf": _weights(1000 * TB, "model.Q4_0.gguf"),
            # Already in the cache (its blob is there), so nothing to download; its weights
            # take more than the neuron's 16GiB of CPU memory: refused by the device check.
            "helexa-test/cached": _weights(TB),
        }
    )
    stub.thread.start()
    try:
        yield stub
    finally:
        stub.close()


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
async def policed(
    hub: HubStub, allowed_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[pb_grpc.NeuronStub]:
    """A neuron that may load from ``allowed_dir`` and helexa-test/*, with a 3 s failed_ttl,
    whose Hub is ``hub``."""
    workdir = tmp_path_factory.mktemp("policed-neuron")
    cache = workdir / "cache"
    blobs = cache / "hub/models--helexa-test--cached/blobs"
    blobs.mkdir(parents=True)
    (blobs / SHA).write_bytes(b"weights already fetched")
    config = neuron_config(
        cache_dir=cache,
        loading={
            "local_dirs": [str(allowed_dir)],
            "hf_repos": ["helexa-test/*", "someone/one-model"],
            "failed_ttl": 3,
        },
    )
    neuron = NeuronProcess(
        workdir, config, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url}
    ).start()
    try:
        await neuron.wait_serving()
        async with neuron.channel() as channel:
            yield pb_grpc.NeuronStub(channel)
    finally:
        neuron.stop()


async def _refusal(stub: pb_grpc.NeuronStub, spec: pb.ModelSpec) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.LoadModel(pb.LoadModelRequest(spec=spec), timeout=60)
    return error.value


async def _listed(stub: pb_grpc.NeuronStub) -> dict[str, pb.ModelStatus]:
    reply = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
    return {m.id: m for m in reply.models}


# ---- the decisions, on given paths and sizes ----


def test_a_path_outside_the_allowed_dirs_gets_one_answer_whether_it_exists_or_not(
    tmp_path: Path,
) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    secret = outside / "secret.gguf"
    secret.write_text("x")
    (allowed / "link.gguf").symlink_to(secret)
    (allowed / "model").mkdir()
    refused = {
        "an existing file": str(secret),
        "a missing file": str(outside / "missing.gguf"),
        "an existing directory": str(outside),
        "a symlink out of an allowed dir": str(allowed / "link.gguf"),
        "a .. out of an allowed dir": str(allowed / ".." / "outside" / "secret.gguf"),
    }
    for what, path in refused.items():
        with pytest.raises(NotAllowed) as error:
            check_source(ModelSpec(id="m", path=path), [str(allowed)], [], "spec")
        assert str(error.value) == f"spec.path {path!r}: {REFUSED_PATH}", what
    # A gguf_file inside an allowed directory must stay inside it too.
    spec = ModelSpec(id="m", path=str(allowed / "model"), gguf_file="../../outside/secret.gguf")
    with pytest.raises(NotAllowed, match=r"loading\.local_dirs"):
        check_source(spec, [str(allowed)], [], "spec")
    # Inside (existing or not, symlinked or not): allowed; resolve() then says what is wrong.
    for path in (allowed / "model", allowed / "missing.gguf", allowed / "model" / ".." / "x"):
        check_source(ModelSpec(id="m", path=str(path)), [str(allowed)], [], "spec")
    link = tmp_path / "link-to-allowed"
    link.symlink_to(allowed)
    check_source(ModelSpec(id="m", path=str(allowed / "model")), [str(link)], [], "spec")


def test_a_refused_path_is_shown_escaped_and_cut() -> None:
    path = "/etc/\nforged log line " + "x" * 1000
    with pytest.raises(NotAllowed) as error:
        check_source(ModelSpec(id="m", path=path), ["/nowhere"], [], "spec")
    message = str(error.value)
    assert "\n" not in message and "\\n" in message
    assert len(message) < SHOWN + 100 and "x" * SHOWN not in message


def test_hf_repos_limits_the_repositories_and_names_the_key() -> None:
    allowed = ["HuggingFaceTB/*", "Qwen/Qwen2.5-0.5B-Instruct"]
    for repo in ("HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"):
        check_source(ModelSpec(id="m", hf_repo=repo), [], allowed, "spec")
    for repo in ("Qwen/Qwen2.5-7B-Instruct", "HuggingFaceTB-evil/x", "someone/model"):
        with pytest.raises(NotAllowed) as error:
            check_source(ModelSpec(id="m", hf_repo=repo), [], allowed, "spec")
        assert str(error.value) == f"spec.hf_repo {repo!r}: not in loading.hf_repos"
    check_source(ModelSpec(id="m", hf_repo="anyone/anything"), [], [], "spec")  # empty: any


@pytest.mark.parametrize(
    ("download", "weights", "dtype", "disk", "device", "refused"),
    [
        (10 * TB, 10 * TB, "auto", 1 * TB, 100 * TB, "disk has"),
        (0, 10 * TB, "auto", 1 * TB, 1 * TB, "device with the most room"),  # all in the cache
        (8 << 30, 8 << 30, "auto", 1 * TB, 5 << 30, ""),  # fp32 files fit in 16 bits
        (8 << 30, 8 << 30, "float32", 1 * TB, 5 << 30, "device with the most room"),
        (8 << 30, 8 << 30, "auto", 1 * TB, None, ""),  # no device figure: disk only
        (8 << 30, 8 << 30, "auto", 8 << 30, 4 << 30, ""),  # exactly fits
    ],
)
def test_a_download_is_refused_unless_it_fits_on_disk_and_on_a_device(
    download: int, weights: int, dtype: str, disk: int, device: int | None, refused: str
) -> None:
    if not refused:
        check_download_fits("hf:a/b@main", download, weights, dtype, disk, device)
        return
    with pytest.raises(NoRoom) as error:
        check_download_fits("hf:a/b@main", download, weights, dtype, disk, device)
    assert "hf:a/b@main does not fit" in str(error.value) and refused in str(error.value)


# ---- a real neuron, its Hub a stub ----


@pytest.mark.parametrize(
    ("repo", "gguf_file", "reason"),
    [
        ("helexa-test/huge", "", "disk has"),
        ("helexa-test/huge-gguf", "model.Q4_0.gguf", "disk has"),
        ("helexa-test/cached", "", "device with the most room"),
    ],
)
async def test_a_hub_model_too_big_is_refused_before_any_download_and_its_entry_expires(
    policed: pb_grpc.NeuronStub, hub: HubStub, repo: str, gguf_file: str, reason: str
) -> None:
    model_id = repo.split("/")[1]
    source = pb.HuggingFaceSource(repo=repo, revision="main", gguf_file=gguf_file)
    error = await _refusal(policed, pb.ModelSpec(id=model_id, huggingface=source))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "does not fit" in (error.details() or "") and reason in (error.details() or "")
    assert hub.about(repo), "the neuron never asked the stub for the sizes"
    assert hub.downloads() == []
    # Listed as FAILED with its error, then forgotten after loading.failed_ttl (3 s).
    failed = (await _listed(policed))[model_id]
    assert failed.state == pb.MODEL_STATE_FAILED and reason in failed.error
    listed_at = time.monotonic()
    while model_id in await _listed(policed):
        assert time.monotonic() < listed_at + 30, "the FAILED entry never expired"
        await asyncio.sleep(0.2)
    print(
        f"\n{repo}: {reason}; metadata requests {len(hub.about(repo))}, downloads "
        f"{len(hub.downloads())}; FAILED listed, gone {time.monotonic() - listed_at:.1f} s later"
    )


async def test_a_repository_off_the_allow_list_is_refused_without_asking_the_hub(
    policed: pb_grpc.NeuronStub, hub: HubStub
) -> None:
    for repo in ("someone/other-model", "helexa-test-evil/huge"):
        source = pb.HuggingFaceSource(repo=repo)
        error = await _refusal(policed, pb.ModelSpec(id="off-list", huggingface=source))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details() == f"spec.hf_repo {repo!r}: not in loading.hf_repos"
        assert hub.about(repo) == []
    assert "off-list" not in await _listed(policed)


async def test_a_local_path_outside_the_allowed_dirs_is_one_refusal_whether_it_exists_or_not(
    policed: pb_grpc.NeuronStub, allowed_dir: Path, tmp_path: Path
) -> None:
    existing = tmp_path / "weights.gguf"
    existing.write_bytes(b"GGUF")
    (allowed_dir / "escape.gguf").symlink_to(existing)
    answers = []
    for path in (existing, tmp_path / "missing.gguf", allowed_dir / "escape.gguf"):
        spec = pb.ModelSpec(id="local", local=pb.LocalSource(path=str(path)))
        error = await _refusal(policed, spec)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        answers.append((error.details() or "").replace(repr(str(path)), "PATH"))
    assert answers == [f"spec.path PATH: {REFUSED_PATH}"] * 3
    print(f"\nlocal paths refused (existing, missing, symlinked out): {answers[0]!r} x3")
    assert "local" not in await _listed(policed)
    # Inside the allowed directory the path is read, and what is wrong with it is said.
    spec = pb.ModelSpec(id="inside", local=pb.LocalSource(path=str(allowed_dir / "nothing")))
    error = await _refusal(policed, spec)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no config.json" in (error.details() or "")
