"""A long load is visible while it runs: its stage and progress in ListModels, in the neuron's
log and metrics, and in ``cortex status`` (table, ``--json`` and ``--watch``).

One real load is watched, end to end: a real ``neuron serve`` process fetches the demo GGUF
from a stand-in Hub (``tests.hubstub``, on a real socket) that lets the bytes through only as
the test allows, so the download is held part-way while the test looks, then the neuron
materialises it into a fresh cache (the dequantisation, tensor by tensor), loads the weights
and makes the engine ready. Then a safetensors repository of several files (the materialised
demo model) is fetched the same way. ListModels is polled by a real gRPC client throughout;
nothing here waits on a duration, only on what the neuron reports.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from neuron.loadprogress import LOG_EVERY
from neuron.sources import HUB_PATTERNS, file_sha256, materialise_gguf
from tests.harness import (
    DEMO_GGUF,
    ROOT,
    SHARED_CACHE,
    CortexProcess,
    NeuronProcess,
    cortex_config,
    metric_value,
    neuron_config,
    run_cli,
)
from tests.hubstub import HubStub

REPO = "helexa-test/slow-gguf"
GGUF = DEMO_GGUF.name
MODEL = "slow-smollm2"
SNAPSHOT_REPO = "helexa-test/slow-safetensors"
CORTEX_STATUS = [sys.executable, "-m", "cortex.cli", "status"]
STAGES: list[int] = [
    pb.LOAD_STAGE_DOWNLOADING,
    pb.LOAD_STAGE_MATERIALISING,
    pb.LOAD_STAGE_LOADING_WEIGHTS,
    pb.LOAD_STAGE_WARMING_UP,
]


@dataclass
class WatchedLoad:
    """What the test saw of the one load, in the order it saw it."""

    size: int
    # ListModels' LoadProgress of the model at every poll while it was LOADING.
    seen: list[pb.LoadProgress] = field(default_factory=list)
    # Two looks while the download was held: at the first allowance, then at a larger one.
    held: list[pb.LoadProgress] = field(default_factory=list)
    status_json: dict[str, Any] = field(default_factory=dict)
    status_table: str = ""
    watch_lines: list[str] = field(default_factory=list)
    watch_exit: int | None = None
    metrics_held: str = ""
    metrics_after: str = ""
    final_state: int = 0
    log: str = ""


def _watch(config: Path, lines: int) -> tuple[list[str], int]:
    """``cortex status --watch --json`` (cortex's view, by its admin API): read ``lines``
    documents, then Ctrl-C it."""
    proc = subprocess.Popen(
        [*CORTEX_STATUS, "--config", str(config), "--json", "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        read = [proc.stdout.readline() for _ in range(lines)]
        proc.send_signal(signal.SIGINT)
        # Read what it still writes until it exits: a pipe left full would hold it in a write.
        proc.communicate(timeout=30)
        return read, proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _lfs(repo: str, file: Path) -> tuple[dict[str, Any], tuple[str, str], tuple[Path, str]]:
    """``file`` as an LFS file of ``repo``: its sibling entry and what the stub serves."""
    size, sha = file.stat().st_size, file_sha256(file)
    sibling = {
        "rfilename": file.name,
        "size": size,
        "blobId": hashlib.sha1(sha.encode()).hexdigest(),
        "lfs": {"sha256": sha, "size": size, "pointerSize": 134},
    }
    return sibling, (repo, file.name), (file, sha)


@dataclass
class Served:
    """The stand-in Hub and the neuron that fetches from it, with a fresh cache."""

    hub: HubStub
    neuron: NeuronProcess
    # The files of the safetensors repository (a materialised demo model).
    snapshot: list[Path]


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    workdir = tmp_path_factory.mktemp("load-progress")
    materialised = await asyncio.to_thread(materialise_gguf, DEMO_GGUF, SHARED_CACHE)
    snapshot = sorted(f for f in materialised.iterdir() if any(f.match(p) for p in HUB_PATTERNS))
    repos: dict[str, list[dict[str, Any]]] = {REPO: [], SNAPSHOT_REPO: []}
    files = {}
    for repo, file in [(REPO, DEMO_GGUF)] + [(SNAPSHOT_REPO, f) for f in snapshot]:
        sibling, where, what = await asyncio.to_thread(_lfs, repo, file)
        repos[repo].append(sibling)
        files[where] = what
    hub = HubStub(repos, files)
    hub.thread.start()
    config = neuron_config(
        cache_dir=workdir / "cache",  # fresh: every file is downloaded (and materialised) here
        loading={"hf_repos": ["helexa-test/*"]},
    )
    neuron = NeuronProcess(
        workdir / "neuron", config, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url}
    ).start()
    try:
        await neuron.wait_serving()
        yield Served(hub, neuron, snapshot)
    finally:
        neuron.stop()
        hub.close()


class Watcher:
    """One LoadModel call in flight and ListModels polled beside it."""

    def __init__(self, stub: pb_grpc.NeuronStub, neuron: NeuronProcess, spec: pb.ModelSpec):
        self.stub, self.neuron, self.model_id = stub, neuron, spec.id
        self.load = asyncio.ensure_future(
            stub.LoadModel(pb.LoadModelRequest(spec=spec), timeout=600)
        )
        self.seen: list[pb.LoadProgress] = []  # at every poll while LOADING

    async def look(self) -> pb.ModelStatus:
        """The model as ListModels lists it now (an empty status before it is listed)."""
        assert not self.load.done() or self.load.exception() is None, self.neuron.log()
        reply = await self.stub.ListModels(pb.ListModelsRequest(), timeout=10)
        model = next((m for m in reply.models if m.id == self.model_id), pb.ModelStatus())
        if model.state == pb.MODEL_STATE_LOADING:
            self.seen.append(model.load)
        return model

    async def until(self, condition: Any, what: str, within: float = 120.0) -> pb.LoadProgress:
        """Poll until ``condition(model)`` holds; its LoadProgress then."""
        deadline = time.monotonic() + within
        while not condition(model := await self.look()):
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)
        return model.load

    async def held(self, hub: HubStub, above: int, what: str) -> pb.LoadProgress:
        """Once the stub has sent every byte it may, poll until the count is past ``above``
        and stays put for half a second: the download standing still at the hold (the count
        can lag the bytes sent by a read, so the first rise is not yet the hold)."""
        await self.until(lambda m: hub.holding() and m.load.done > above, what)
        deadline = time.monotonic() + 120.0
        while True:
            before = (await self.look()).load
            await asyncio.sleep(0.5)
            after = (await self.look()).load
            if after.done == before.done:
                return after
            assert time.monotonic() < deadline, f"{what}: the count never stood still"

    async def to_the_end(self) -> pb.ModelStatus:
        """Poll until the load ends; the model as listed after it."""
        while not self.load.done():
            await self.look()
            await asyncio.sleep(0.02)
        await self.load
        return await self.look()


@pytest.fixture(scope="module")
async def watched(
    served: Served, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[WatchedLoad]:
    hub, neuron = served.hub, served.neuron
    size = DEMO_GGUF.stat().st_size
    cortex = CortexProcess(tmp_path_factory.mktemp("cortex"), cortex_config([neuron]))
    watched = WatchedLoad(size)
    try:
        cortex.start()
        await cortex.wait_ready()
        async with neuron.channel() as channel:
            spec = pb.ModelSpec(
                id=MODEL, huggingface=pb.HuggingFaceSource(repo=REPO, gguf_file=GGUF)
            )
            watcher = Watcher(pb_grpc.NeuronStub(channel), neuron, spec)
            # A quarter of the file, held: the download stands still part-way.
            start = hub.sent
            hub.allow(start + size // 4)
            first = await watcher.held(hub, 0, "no progress while held")
            watched.held.append(first)
            watched.metrics_held = neuron.metrics()
            # Polled from here (--direct): the neuron's figures now, not cortex's last poll.
            done = await asyncio.to_thread(
                run_cli, "cortex", "status", cortex.config_path, "--direct"
            )
            watched.status_table = done.stdout + done.stderr
            result = await asyncio.to_thread(
                run_cli, "cortex", "status", cortex.config_path, "--direct", "--json"
            )
            watched.status_json = json.loads(result.stdout)
            watched.watch_lines, watched.watch_exit = await asyncio.to_thread(
                _watch, cortex.config_path, 2
            )
            # Three quarters: the count rises and holds again.
            hub.allow(start + 3 * size // 4)
            watched.held.append(await watcher.held(hub, first.done, "the count never rose"))
            # The rest: watch every stage go by until the load ends.
            hub.allow(start + size)
            final = await watcher.to_the_end()
            watched.seen = watcher.seen
            watched.final_state = final.state
            watched.metrics_after = neuron.metrics()
        watched.log = neuron.log()
        yield watched
    finally:
        cortex.stop()


def _stage_order(seen: list[pb.LoadProgress]) -> list[int]:
    order: list[int] = []
    for p in seen:
        if p.stage != pb.LOAD_STAGE_UNSPECIFIED and (not order or order[-1] != p.stage):
            order.append(p.stage)
    return order


def test_list_models_shows_a_loads_stages_in_order_and_its_progress_rising(
    watched: WatchedLoad,
) -> None:
    order = _stage_order(watched.seen)
    # Each stage seen once, in the order a load passes through them; download and
    # materialisation (the long ones) always seen.
    assert order == sorted(order, key=STAGES.index) and len(set(order)) == len(order), order
    assert order[:2] == [pb.LOAD_STAGE_DOWNLOADING, pb.LOAD_STAGE_MATERIALISING], order
    assert watched.final_state == pb.MODEL_STATE_READY
    # While held, the download counts bytes of the file's size, and the count rises.
    first, second = watched.held
    for held in (first, second):
        assert held.stage == pb.LOAD_STAGE_DOWNLOADING and held.unit == pb.LOAD_UNIT_BYTES
        assert held.total == watched.size
    assert 0 < first.done <= watched.size // 4 < second.done <= 3 * watched.size // 4
    downloads = [p.done for p in watched.seen if p.stage == pb.LOAD_STAGE_DOWNLOADING]
    assert downloads == sorted(downloads)
    # The dequantisation counts tensors converted of the file's, rising to all of them.
    tensors = [p for p in watched.seen if p.stage == pb.LOAD_STAGE_MATERIALISING and p.total]
    assert tensors and {p.unit for p in tensors} == {pb.LOAD_UNIT_TENSORS}
    counts = [p.done for p in tensors]
    assert counts == sorted(counts) and len(set(counts)) >= 2, counts
    assert all(p.total == tensors[0].total for p in tensors) and counts[-1] <= tensors[0].total


def test_the_neuron_logs_each_stage_once_and_progress_seldom(watched: WatchedLoad) -> None:
    stages = re.findall(rf"model load stage model={MODEL} stage=(\S+)", watched.log)
    assert stages == ["downloading", "materialising", "loading_weights", "warming_up"], stages
    assert f"model loaded model={MODEL}" in watched.log
    # Progress at most once every LOG_EVERY seconds per stage: far fewer lines than the
    # hundreds of tensors the materialisation counted one by one.
    tensors = max(p.total for p in watched.seen if p.stage == pb.LOAD_STAGE_MATERIALISING)
    lines = re.findall(rf"model load progress model={MODEL} stage=materialising .*", watched.log)
    assert tensors > 100 and len(lines) < tensors // 10, (LOG_EVERY, lines)
    for line in lines:
        assert re.search(r"done=\d+ total=\d+ unit=tensors percent=\d+\.\d", line), line


def test_the_downloaded_bytes_are_counted_and_the_load_gauge_follows(
    watched: WatchedLoad,
) -> None:
    held = metric_value(watched.metrics_held, "helexa_neuron_downloaded_bytes_total")
    assert 0 < held <= watched.size // 4
    assert metric_value(watched.metrics_held, "helexa_neuron_models_loading") == 1
    after = metric_value(watched.metrics_after, "helexa_neuron_downloaded_bytes_total")
    assert after == watched.size
    assert metric_value(watched.metrics_after, "helexa_neuron_models_loading") == 0


def test_cortex_status_shows_the_loading_model_as_table_and_json(watched: WatchedLoad) -> None:
    first = watched.held[0]
    percent = 100 * first.done // first.total
    # The held download: the same figures in every view (the download cannot move past them).
    line = f"LOADING {percent}% downloading {first.done / 1e6:.1f} of {first.total / 1e6:.1f} MB"
    assert line in watched.status_table, watched.status_table
    neuron = watched.status_json["neurons"][0]
    assert neuron["status"] == "up" and watched.status_json["up"] == 1
    (model,) = [m for m in neuron["models"] if m["id"] == MODEL]
    assert model["state"] == "LOADING"
    assert model["load"] == {
        "stage": "downloading",
        "unit": "bytes",
        "done": first.done,
        "total": watched.size,
        "percent": round(100 * first.done / watched.size, 1),
    }
    # --watch: one JSON document per poll, and Ctrl-C ends it cleanly.
    assert watched.watch_exit == 0
    assert len(watched.watch_lines) == 2
    for text in watched.watch_lines:
        (watching,) = json.loads(text)["neurons"][0]["models"]
        assert watching["load"]["stage"] == "downloading"


async def test_a_repository_snapshot_counts_the_bytes_of_all_its_files_as_they_arrive(
    served: Served,
) -> None:
    """A safetensors repository (several files, fetched at once): one count over them all."""
    hub, neuron = served.hub, served.neuron
    total = sum(f.stat().st_size for f in served.snapshot)
    before = metric_value(neuron.metrics(), "helexa_neuron_downloaded_bytes_total")
    async with neuron.channel() as channel:
        spec = pb.ModelSpec(
            id="slow-snapshot", huggingface=pb.HuggingFaceSource(repo=SNAPSHOT_REPO)
        )
        watcher = Watcher(pb_grpc.NeuronStub(channel), neuron, spec)
        start = hub.sent
        hub.allow(start + total // 2)
        held = await watcher.until(lambda m: m.load.done > 0, "no progress while held")
        assert (held.stage, held.unit, held.total) == (
            pb.LOAD_STAGE_DOWNLOADING,
            pb.LOAD_UNIT_BYTES,
            total,
        )
        assert 0 < held.done <= total // 2
        hub.allow(start + total)
        final = await watcher.to_the_end()
    assert final.state == pb.MODEL_STATE_READY
    order = _stage_order(watcher.seen)
    assert order[0] == pb.LOAD_STAGE_DOWNLOADING and order == sorted(order, key=STAGES.index)
    assert pb.LOAD_STAGE_MATERIALISING not in order
    stages = re.findall(r"model load stage model=slow-snapshot stage=(\S+)", neuron.log())
    assert stages == ["downloading", "loading_weights", "warming_up"], stages
    after = metric_value(neuron.metrics(), "helexa_neuron_downloaded_bytes_total")
    assert after - before == total
