"""The devices models can be placed on, and their memory.

CUDA devices report free memory from the driver (``torch.cuda.mem_get_info``) less a reserve
for activations and KV caches. The CPU has a budget from the config; its free memory is that
budget less what the models placed on it hold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from neuron.config import DevicesConfig


@dataclass(frozen=True)
class Device:
    """One device a model can be placed on."""

    kind: str  # "cpu" or "cuda"
    index: int
    description: str
    total_bytes: int

    @property
    def name(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_description() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 beats fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def discover(config: DevicesConfig) -> list[Device]:
    """The devices this neuron may use, as ``devices.use`` selects them."""
    import torch

    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wanted: list[Device] = []
    for name in config.use:
        if name == "cpu":
            wanted.append(_cpu(config))
        elif name in ("auto", "cuda"):
            if cuda_count:
                wanted.extend(_cuda(i) for i in range(cuda_count))
            elif name == "auto":
                wanted.append(_cpu(config))
        else:
            index = int(name.split(":", 1)[1])
            if index < cuda_count:
                wanted.append(_cuda(index))
    unique = {d.name: d for d in wanted}
    return list(unique.values())


def _cpu(config: DevicesConfig) -> Device:
    budget = config.cpu_memory_budget
    if budget is None:
        budget = physical_memory() * 3 // 4
    return Device("cpu", 0, cpu_description(), budget)


def _cuda(index: int) -> Device:
    import torch

    props = torch.cuda.get_device_properties(index)
    return Device("cuda", index, props.name, props.total_memory)


def cuda_free_bytes(index: int) -> int:
    import torch

    free, _total = torch.cuda.mem_get_info(index)
    return int(free)
