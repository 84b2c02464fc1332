"""Hosts for end-to-end tests: Linux network namespaces joined by veth links on one bridge.

A ``Network`` is a bridge in the test's own namespace holding the subnet's first address, so
the test reaches every host directly, and one namespace per host, each with its own address
on a veth link whose other end is a port of the bridge. A daemon runs on a host with its
command prefixed by ``ip netns exec NAME`` (which execs it: signals reach the daemon itself).
Faults are made on a host's link: taken down, every packet dropped (nftables in the host's
namespace), delay and loss (``tc netem``, where the kernel has it).

Names carry the test process's pid, so parallel runs never collide; a crashed run's leftovers
(their pid gone) are removed by the next run that builds a network.

``hosted_fleet`` builds what the multi-neuron tests run on: a cortex host and neuron hosts,
each daemon bound to its host's address, cortex configured with those addresses only.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cortex.neuronlink import Link
from tests.harness import (
    DEMO_ID,
    CortexProcess,
    NeuronProcess,
    catalogue_model,
    cortex_config,
    demo_model,
    neuron_config,
)

NEURON_PORT, NEURON_METRICS_PORT = 13131, 13132
CORTEX_PORT, CORTEX_METRICS_PORT = 31313, 31314
# The subnet's second octet; the third is picked per network among those not in use here.
SUBNET = "10.77"
# Names: namespaces "helexa-PID-K-HOST", interfaces "hxPID-K..." (pid in hex: at most 15
# characters in all, the kernel's limit for an interface name).
_NETNS = re.compile(r"^helexa-(\d+)-")
_IFACE = re.compile(r"^hx([0-9a-f]+)-\d+")
_DROP_TABLE = "helexa_drop"
_networks = itertools.count()
_swept = False


class Refused(Exception):
    """The kernel (or a missing tool) refuses what a network needs: why, in one line."""


def _run(*command: str, stdin: str | None = None) -> str:
    """Run an iproute2 or nftables command to its end; ``Refused`` with its stderr if it fails."""
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise Refused(f"{command[0]} is not installed (make system-deps)") from None
    if done.returncode != 0:
        raise Refused(f"`{' '.join(command)}`: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _quietly(*command: str) -> None:
    """A teardown step: whatever it finds already gone is fine."""
    subprocess.run(command, capture_output=True, timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep() -> None:
    """Remove namespaces and interfaces left by runs that died without their teardown: those
    whose pid is gone, and those of an earlier process that had this one's pid."""
    for line in _run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NETNS.match(name)
        if match and (int(match[1]) == os.getpid() or not _alive(int(match[1]))):
            _quietly("ip", "netns", "delete", name)
    for line in _run("ip", "-o", "link", "show").splitlines():
        name = line.split(": ")[1].split("@")[0]
        match = _IFACE.match(name)
        if match and (int(match[1], 16) == os.getpid() or not _alive(int(match[1], 16))):
            _quietly("ip", "link", "delete", name)


def namespaces_refusal() -> str | None:
    """Why network namespaces cannot be built here (not root, no CAP_NET_ADMIN, no iproute2
    or nftables), or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (make system-deps)"
    if shutil.which("nft") is None:
        return "nftables' `nft` is not installed (make system-deps)"
    probe = f"helexa-{os.getpid()}-probe-{uuid.uuid4().hex[:8]}"
    try:
        _run("ip", "netns", "add", probe)
    except Refused as e:
        return f"the kernel refuses network namespaces here: {e}"
    _quietly("ip", "netns", "delete", probe)
    return None


def netem_refusal() -> str | None:
    """Why ``tc netem`` cannot delay or drop packets here (the kernel lacks sch_netem, say),
    or None when it can: tried on the loopback of a namespace of its own."""
    probe = f"helexa-{os.getpid()}-probe-{uuid.uuid4().hex[:8]}"
    try:
        _run("ip", "netns", "add", probe)
    except Refused as e:
        return f"the kernel refuses network namespaces here: {e}"
    try:
        _run("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
             "delay", "1ms")  # fmt: skip
    except Refused as e:
        return f"tc netem is not available in this kernel: {e}"
    finally:
        _quietly("ip", "netns", "delete", probe)
    return None


@dataclass
class Host:
    """One host: a namespace with one address, on a veth link to the network's bridge."""

    name: str
    netns: str
    address: str
    # The bridge's end of the host's link (in the test's namespace); the host's end is eth0.
    port: str

    @property
    def launcher(self) -> list[str]:
        """What runs a command on this host."""
        return ["ip", "netns", "exec", self.netns]

    def endpoint(self, port: int) -> str:
        return f"{self.address}:{port}"

    def run(self, *command: str, stdin: str | None = None) -> str:
        return _run(*self.launcher, *command, stdin=stdin)

    def cut(self) -> None:
        """Take the host's link down: nothing reaches it or leaves it, and nobody is told."""
        _run("ip", "link", "set", self.port, "down")

    def mend(self) -> None:
        _run("ip", "link", "set", self.port, "up")

    def drop_everything(self) -> None:
        """Silently drop every packet in and out of the host (its link stays up)."""
        self.run(
            "nft",
            "-f",
            "-",
            stdin=f"table inet {_DROP_TABLE} {{\n"
            "  chain input { type filter hook input priority 0; policy drop; }\n"
            "  chain output { type filter hook output priority 0; policy drop; }\n"
            "}\n",
        )

    def stop_dropping(self) -> None:
        self.run("nft", "delete", "table", "inet", _DROP_TABLE)

    def degrade(self, delay_ms: int, loss_percent: float) -> None:
        """Delay and lose packets both ways on the host's link (``tc netem`` at each end)."""
        netem = ["netem", "delay", f"{delay_ms}ms", "loss", f"{loss_percent}%"]
        self.run("tc", "qdisc", "replace", "dev", "eth0", "root", *netem)
        _run("tc", "qdisc", "replace", "dev", self.port, "root", *netem)

    def restore(self) -> None:
        self.run("tc", "qdisc", "delete", "dev", "eth0", "root")
        _run("tc", "qdisc", "delete", "dev", self.port, "root")


@dataclass
class Network:
    """A bridge with an address in its own /24 and the hosts on it; ``close`` removes all."""

    number: int = field(default_factory=lambda: next(_networks))  # in this process
    hosts: list[Host] = field(default_factory=list)
    prefix: str = ""  # "10.77.N", chosen on open

    @property
    def bridge(self) -> str:
        return f"hx{os.getpid():x}-{self.number}"

    @property
    def gateway(self) -> str:
        """The test's own address on the bridge."""
        return f"{self.prefix}.1"

    def open(self) -> Network:
        global _swept
        if not _swept:
            _sweep()
            _swept = True
        # No netfilter on the bridge's own traffic (br_netfilter may send it through iptables).
        _run("ip", "link", "add", self.bridge, "type", "bridge", "nf_call_iptables", "0",
             "nf_call_ip6tables", "0", "nf_call_arptables", "0")  # fmt: skip
        self.prefix = self._free_prefix()
        _run("ip", "address", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        return self

    def _free_prefix(self) -> str:
        used = set(re.findall(rf"inet ({re.escape(SUBNET)}\.\d+)\.", _run("ip", "-o", "addr")))
        start = os.getpid() % 250
        for i in range(250):
            prefix = f"{SUBNET}.{(start + i) % 250 + 1}"
            if prefix not in used:
                return prefix
        raise Refused(f"no free /24 left in {SUBNET}.0.0/16")

    def add_host(self, name: str) -> Host:
        i = len(self.hosts)
        host = Host(
            name=name,
            netns=f"helexa-{os.getpid()}-{self.number}-{name}",
            address=f"{self.prefix}.{i + 2}",
            port=f"{self.bridge}p{i}",
        )
        self.hosts.append(host)  # before it exists: close() removes what was made of it
        _run("ip", "netns", "add", host.netns)
        _run("ip", "link", "add", host.port, "type", "veth", "peer", "name", "eth0",
             "netns", host.netns)  # fmt: skip
        _run("ip", "link", "set", host.port, "master", self.bridge, "up")
        _run("ip", "-n", host.netns, "address", "add", f"{host.address}/24", "dev", "eth0")
        _run("ip", "-n", host.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", host.netns, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Remove every link, namespace and the bridge; safe after a partial ``open``."""
        for host in self.hosts:
            _quietly("ip", "link", "delete", host.port)  # both ends of the veth
            _quietly("ip", "netns", "delete", host.netns)
        _quietly("ip", "link", "delete", self.bridge)


@contextlib.contextmanager
def network() -> Iterator[Network]:
    """A network, removed on the way out whatever happened."""
    net = Network()
    try:
        yield net.open()
    finally:
        net.close()


# The neurons' token: beyond loopback a neuron asks for one (or refuses to start).
TOKEN = "helexa-fleet-test-token"


@dataclass
class HostedFleet:
    """cortex and neurons, each on a host of its own."""

    network: Network
    cortex: CortexProcess
    neurons: list[NeuronProcess]
    hosts: dict[str, Host]  # by neuron name, and "cortex"


@contextlib.asynccontextmanager
async def hosted_fleet(
    root: Path,
    neurons: int = 2,
    model: dict[str, Any] | None = None,
    drain_timeout: float = 300.0,
    **cortex_sections: Any,
) -> AsyncIterator[HostedFleet]:
    """A cortex host and ``neurons`` neuron hosts (n0, n1, ...), each neuron serving ``model``
    (the demo model by default) on its host's address and ports, cortex on its own host
    configured with those endpoints (``cortex_sections`` added to its config). Daemons are
    stopped, then the network removed, on the way out."""
    started: list[NeuronProcess] = []
    cortex: CortexProcess | None = None
    with network() as net:
        try:
            hosts = {f"n{i}": net.add_host(f"n{i}") for i in range(neurons)}
            hosts["cortex"] = net.add_host("cortex")
            for name in (f"n{i}" for i in range(neurons)):
                host = hosts[name]
                config = neuron_config(
                    [model or demo_model()],
                    drain_timeout=drain_timeout,
                    listen=host.endpoint(NEURON_PORT),
                    metrics_listen=host.endpoint(NEURON_METRICS_PORT),
                    auth={"token": TOKEN},
                )
                neuron = NeuronProcess(
                    root / name, config, link=Link(token=TOKEN), launcher=host.launcher
                )
                started.append(neuron.start())
            for neuron in started:
                await neuron.wait_serving()
            config = cortex_config(started, **cortex_sections)
            config["listen"] = hosts["cortex"].endpoint(CORTEX_PORT)
            config["metrics_listen"] = hosts["cortex"].endpoint(CORTEX_METRICS_PORT)
            config.setdefault("fleet", {})["token"] = TOKEN
            auth = config.setdefault("auth", {})
            # Beyond loopback cortex asks for keys; a fleet given none lets anyone in.
            auth.setdefault(
                "allow_unauthenticated", not (auth.get("keys") or auth.get("keys_file"))
            )
            cortex = CortexProcess(
                root / "cortex",
                config,
                models=[catalogue_model(DEMO_ID)],
                launcher=hosts["cortex"].launcher,
            ).start()
            await cortex.wait_ready()
            yield HostedFleet(net, cortex, started, hosts)
        finally:
            if cortex is not None:
                cortex.stop()
            for neuron in started:
                neuron.stop()
