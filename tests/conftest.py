"""Shared fixtures: the demo model materialised once, real neuron processes, hosts as network
namespaces, the RPMs.

Also what may be skipped: a test marked ``cuda`` skips where torch sees no CUDA device, one
marked ``kernel`` where the kernel refuses what it needs (network namespaces, netem), saying
which. With ``HELEXA_NO_SKIPS=1`` (``make test`` sets it, after ``make system-deps``) every
other skip fails its test with the skip's reason, so a missing tool or a broken setup cannot
pass silently as a run with fewer tests.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import (
    DEMO_GGUF,
    DEMO_ID,
    SHARED_CACHE,
    STARTED,
    CortexProcess,
    NeuronProcess,
    NotifySocket,
    catalogue_model,
    cortex_config,
    demo_model,
    neuron_config,
)
from tests.netns import namespaces_refusal
from tests.packages import Package, build, counting_index, install_venv, unpack, wheelhouse

NO_SKIPS = os.environ.get("HELEXA_NO_SKIPS") == "1"

# A run started in the background by a shell without job control (`make test &`, nohup, some
# CI runners) inherits SIGINT ignored, and so would every process it starts: a Python program
# then never sees Ctrl-C (`cortex status --watch`, whose end is a Ctrl-C, waited forever).
# Handled here, it is the default again in every child (exec resets a handled signal).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# Skips HELEXA_NO_SKIPS=1 allows: what no package installs (a GPU, a kernel's facilities).
ALLOWED_SKIPS = ("cuda", "kernel")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "namespaces" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kernel)
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if marked and not _cuda_available():
        for item in marked:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def _no_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under HELEXA_NO_SKIPS=1, a skip becomes a failure that gives its reason."""
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"skipped, and HELEXA_NO_SKIPS=1 allows only CUDA and kernel skips: {reason}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _no_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the stacks and log ends of the daemons still running; a
    skip fails under HELEXA_NO_SKIPS=1 unless the test is marked ``cuda`` or ``kernel``."""
    outcome = yield
    report = outcome.get_result()
    if not any(item.get_closest_marker(marker) for marker in ALLOWED_SKIPS):
        _no_skip(report)
    if report.when == "call" and report.failed:
        for daemon in STARTED:
            if daemon.proc is not None and daemon.proc.poll() is None:
                title = f"{daemon.name} pid {daemon.proc.pid} ({daemon.workdir})"
                report.sections.append((title, daemon.stacks_and_log()))


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo GGUF materialised into the shared test cache (once per machine)."""
    if not DEMO_GGUF.exists():
        pytest.fail(f"{DEMO_GGUF} is missing: run `make model`")
    from neuron.sources import materialise_gguf

    return materialise_gguf(DEMO_GGUF, SHARED_CACHE)


@pytest.fixture(scope="session")
def shared_neuron(
    demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NeuronProcess]:
    """One neuron with the demo model, shared by tests that do not stop or reconfigure it."""
    neuron = NeuronProcess(
        tmp_path_factory.mktemp("shared-neuron"), neuron_config([demo_model()])
    ).start()
    try:
        yield neuron
    finally:
        neuron.stop()


@pytest.fixture
async def shared_stub(shared_neuron: NeuronProcess) -> AsyncIterator[pb_grpc.NeuronStub]:
    await shared_neuron.wait_serving()
    async with grpc.aio.insecure_channel(shared_neuron.endpoint) as channel:
        yield pb_grpc.NeuronStub(channel)


@pytest.fixture(scope="session")
async def shared_cortex(
    shared_neuron: NeuronProcess, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[CortexProcess]:
    """One cortex over the shared neuron (the demo model pinned, alias "smol"), shared by
    tests that do not stop or reconfigure it."""
    await shared_neuron.wait_serving()
    process = CortexProcess(
        tmp_path_factory.mktemp("shared-cortex"),
        cortex_config([shared_neuron], limits={"max_tokens": 4096, "max_body": "1MiB"}),
        models=[catalogue_model(DEMO_ID, aliases=["smol"], pinned=True)],
    ).start()
    try:
        await process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def neurons(tmp_path: Path) -> Iterator[list[NeuronProcess]]:
    """Neurons a test starts itself (append to the list); all stopped at the end."""
    started: list[NeuronProcess] = []
    try:
        yield started
    finally:
        for neuron in started:
            neuron.stop()


@pytest.fixture(scope="session")
def namespaces() -> None:
    """Hosts can be built as network namespaces here (tests/netns.py); where the kernel or a
    missing tool refuses them, the test skips, saying why."""
    reason = namespaces_refusal()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A stand-in for systemd's ``$NOTIFY_SOCKET``, in the test's tmp dir."""
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture(scope="session")
def rpms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Package]:
    """helexa-cortex and helexa-neuron built from this tree (keyed cortex, neuron)."""
    return build(tmp_path_factory.mktemp("rpmbuild"))


@pytest.fixture(scope="session")
def unpacked(rpms: dict[str, Package], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both packages' files unpacked into one root directory."""
    root = tmp_path_factory.mktemp("rpmroot")
    for package in rpms.values():
        unpack(package, root)
    return root


@pytest.fixture(scope="session")
def cortex_venv(unpacked: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The virtualenv helexa-cortex's install-venv makes for real, from a local wheelhouse
    (no index asked): /opt/helexa/cortex-venv as an operator's host would have it."""
    requirements = unpacked / "usr/share/helexa-cortex/requirements.txt"
    venv = tmp_path_factory.mktemp("cortex-venv") / "venv"
    found = wheelhouse(requirements)
    with counting_index() as (index, asked):  # the index pip is told of: never asked
        done = install_venv(
            unpacked, "cortex", venv, {"HELEXA_WHEELHOUSE": str(found), "PIP_INDEX_URL": index}
        )
    assert done.returncode == 0, f"install-venv failed:\n{done.stdout}\n{done.stderr}"
    assert asked == [], f"install-venv asked an index: {asked}"
    assert f"{venv} is ready" in done.stdout
    return venv
