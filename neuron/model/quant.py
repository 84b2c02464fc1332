"""4-bit weights run as 4-bit on the CPU: linears whose weights are exactly 4-bit groups.

A GGUF Q4_0/Q4_1 file stores each linear as groups of 32 weights, each group ``d * q + m``
with ``q`` in 0..15. Materialising it dequantises those weights to floats, and a dense
matmul then streams 4-8 times the bytes the file held: on a CPU a decode step is bound by
memory bandwidth, so it runs that much slower than it has to. ``find_int4`` finds the
linears whose float weights are exactly such groups (it checks, so it never changes a model
that was not 4-bit to start with); their codes are saved beside the materialised weights
(``int4.safetensors``) and ``Linear`` runs them with torch's int4 weight-only kernel, which
reads 4 bits per weight.

That kernel's cost grows with the number of rows it multiplies while a dense matmul's
barely does (measured on an AVX512 CPU, 16-bit activations: 5x less than dense at 1 row, 2x
less at 8, even near 24-32), so the dense weight is kept for prompts (many rows at once) and
the codes serve decode steps (one row per running sequence). The choice depends only on the
kind of step, never on how many requests share it, so a request's arithmetic is the same
whatever batch it runs in.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32
INT4_FILE = "int4.safetensors"
# The vocabulary projection's codes where it is exactly 8-bit groups (GGUF's Q8_0).
INT8_FILE = "int8.safetensors"
# A group is "exactly 4-bit" when rebuilding it from 4-bit codes is off by at most this
# fraction of the group's range (dequantised GGUF groups rebuild to float32 rounding).
_TOLERANCE = 1e-5


class Codes:
    """A weight as 4-bit codes: ``weight = codes * scale + low`` per group of 32 inputs."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> None:
        self.codes = codes  # uint8 [out, in], values 0..15
        self.scale = scale  # float32 [out, in / GROUP]
        self.low = low  # float32 [out, in / GROUP]

    @staticmethod
    def cat(parts: list[Codes]) -> Codes:
        """Codes of the weights stacked along the output dimension (fused projections)."""
        return Codes(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.low for p in parts]),
        )


def codes_of(weight: torch.Tensor) -> Codes | None:
    """The 4-bit codes of a float32 weight, or None where it is not exactly 4-bit groups."""
    out_features, in_features = weight.shape
    if in_features % GROUP or weight.dtype != torch.float32:
        return None
    w = weight.detach().reshape(out_features, in_features // GROUP, GROUP)
    low = w.amin(-1, keepdim=True)
    span = w.amax(-1, keepdim=True) - low
    scale = torch.where(span > 0, span / 15, torch.ones_like(span))
    codes = torch.round((w - low) / scale).clamp_(0, 15)
    error = (codes * scale + low - w).abs().amax(-1, keepdim=True)
    if bool((error > _TOLERANCE * span.clamp(min=1e-30)).any()):
        return None
    return Codes(
        codes.reshape(out_features, in_features).to(torch.uint8),
        scale.squeeze(-1),
        low.squeeze(-1),
    )


class Codes8:
    """A weight as 8-bit codes: ``weight = codes * scale`` per group of 32 inputs."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.codes = codes  # int8 [out, in], values -127..127
        self.scale = scale  # float32 [out, in / GROUP]


def codes8_of(weight: torch.Tensor) -> Codes8 | None:
    """The 8-bit codes of a float32 weight (a GGUF Q8_0 tensor dequantised: each group
    ``d * q`` with its largest ``|q|`` 127), or None where it is not exactly that."""
    out_features, in_features = weight.shape
    if in_features % GROUP or weight.dtype != torch.float32:
        return None
    w = weight.detach().reshape(out_features, in_features // GROUP, GROUP)
    top = w.abs().amax(-1, keepdim=True)
    scale = top / 127
    codes = torch.round(w / torch.where(top > 0, scale, torch.ones_like(scale)))
    error = (codes * scale - w).abs().amax(-1, keepdim=True)
    if bool((error > _TOLERANCE * top.clamp(min=1e-30)).any()):
        return None
    return Codes8(codes.reshape(out_features, in_features).to(torch.int8), scale.squeeze(-1))


def save_int8(found: dict[str, Codes8], path: Path) -> None:
    _save({n: {"codes": c.codes, "scale": c.scale} for n, c in found.items()}, path)


def load_int8(model_dir: Path) -> dict[str, Codes8]:
    """The 8-bit codes saved beside a materialised model, or none."""
    return {n: Codes8(t["codes"], t["scale"]) for n, t in _load(model_dir / INT8_FILE).items()}


def _save(found: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """Each weight's tensors as ``<weight>.<part>`` in one safetensors file."""
    from safetensors.torch import save_file

    tensors = {
        f"{n}.{part}": t.contiguous() for n, parts in found.items() for part, t in parts.items()
    }
    save_file(tensors, str(path))


def _load(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """What ``_save`` wrote, by weight; nothing where there is no such file."""
    if not path.exists():
        return {}
    from safetensors.torch import load_file

    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        name, part = key.rsplit(".", 1)
        found.setdefault(name, {})[part] = tensor
    return found


def find_int4(model: nn.Module) -> dict[str, Codes]:
    """The codes of every linear of a float32 ``model`` whose weight is exactly 4-bit."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            codes = codes_of(module.weight)
            if codes is not None:
                found[name] = codes
    return found


def save_int4(found: dict[str, Codes], path: Path) -> None:
    # Two codes to a byte: even columns in the low nibble.
    packed = {
        n: {"codes": c.codes[:, ::2] | (c.codes[:, 1::2] << 4), "scale": c.scale, "low": c.low}
        for n, c in found.items()
    }
    _save(packed, path)


def load_int4(model_dir: Path) -> dict[str, Codes]:
    """The codes saved beside a materialised model, or none."""
    found = {}
    for name, t in _load(model_dir / INT4_FILE).items():
        packed = t["codes"]
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        found[name] = Codes(codes, t["scale"], t["low"])
    return found


def int4_kernel_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the int4 kernel pays here: on the CPU, with 16-bit activations."""
    return (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    )


class Linear:
    """A projection: dense, or dense plus 4-bit codes that serve few-row multiplications."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        codes: Codes | None = None,
        upcast: bool = False,
    ) -> None:
        self.weight = weight
        self.bias = bias
        # 16-bit weights on a CPU without native 16-bit arithmetic: a multiplication of
        # several rows runs in float32 (the weight cast as it is read), 5-8x faster there
        # than the 16-bit kernel at 40-200 rows; a single row stays 16-bit (the cast would
        # cost more than the product).
        self.upcast = upcast
        self.out_features, self.in_features = weight.shape
        self.packed: torch.Tensor | None = None
        self.scales_zeros: torch.Tensor | None = None
        if codes is not None:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.codes.to(torch.int32), 1
            )
            # The kernel computes (q - 8) * scale + zero per group: [groups, out, 2].
            zero = codes.low + 8 * codes.scale
            self.scales_zeros = (
                torch.stack([codes.scale.t(), zero.t()], dim=-1).to(weight.dtype).contiguous()
            )

    def __call__(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """``x @ weight.T + bias``; a decode step (one token per row) runs the 4-bit codes."""
        if self.packed is None or not decode:
            if self.upcast and x.numel() > self.in_features:
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(rows, self.in_features), self.packed, GROUP, self.scales_zeros
        )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def tensors(self) -> list[torch.Tensor]:
        found = [self.weight, self.bias, self.packed, self.scales_zeros]
        return [t for t in found if t is not None]
