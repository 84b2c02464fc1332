"""The decode step's CPU kernel: ``decode.c``, built for this host when a neuron starts.

A decode step on a CPU runs a few rows through every weight once; in torch it is some 2,000
small operators, whose dispatch costs as much as the arithmetic, and a 4-bit matmul kernel
that reads its weights at a fraction of the memory's speed. ``decode.c`` runs every layer of
such a step in one call (see there). It is C compiled by the host's compiler for the host's
CPU (``-march=native``) into a private temporary directory, once per process: a second or
two at start-up, and the binary always matches the CPU it runs on. Without a compiler, or
where the build fails, the step stays torch's (logged once).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from neuron.model.quant import GROUP, Codes, Codes8

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-std=c11")
_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class _Q4(ctypes.Structure):
    _fields_ = [
        ("codes", _PTR), ("scale", _PTR), ("low", _PTR), ("bias", _PTR),
        ("out", _I64), ("inputs", _I64),
    ]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [
        ("attn_norm", _PTR), ("mlp_norm", _PTR),
        ("qkv", _Q4), ("o", _Q4), ("gate_up", _Q4), ("down", _Q4),
    ]  # fmt: skip


class _Model(ctypes.Structure):
    _fields_ = [
        ("layers", _I64), ("hidden", _I64), ("heads", _I64), ("kv_heads", _I64),
        ("head_dim", _I64), ("inter", _I64), ("eps", _F32), ("kv_bf16", _I64),
        ("pool", _PTR), ("slots", _I64), ("layer", ctypes.POINTER(_Layer)),
        ("norm", _PTR), ("lm_head", _PTR), ("lm_codes", _PTR), ("lm_scale", _PTR),
        ("lm_bias", _PTR), ("vocab", _I64), ("lm_bf16", _I64),
    ]  # fmt: skip


class _Step(ctypes.Structure):
    _fields_ = [
        ("tokens", _I64), ("x", _PTR), ("pos", _PTR), ("slot", _PTR), ("table", _PTR),
        ("width", _I64), ("cos", _PTR), ("sin", _PTR),
        ("outputs", _I64), ("chosen", _PTR), ("logits", _PTR),
    ]  # fmt: skip


@functools.cache
def library() -> ctypes.CDLL | None:
    """``decode.c`` built and loaded, or None where it cannot be (the reason logged)."""
    if os.environ.get("HELEXA_NO_KERNEL"):
        log.info("decode kernel off (HELEXA_NO_KERNEL)")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("decode kernel not built: no C compiler (cc) here; decode steps run in torch")
        return None
    with tempfile.TemporaryDirectory(prefix="helexa-kernel-") as folder:
        built = Path(folder) / "decode.so"
        command = [compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
            lib = ctypes.CDLL(str(built))
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            log.warning("decode kernel not built (%s); decode steps run in torch", detail[-2000:])
            return None
    lib.helexa_decode.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Step), ctypes.c_int]
    lib.helexa_decode.restype = ctypes.c_int
    log.info("decode kernel built compiler=%s", compiler)
    return lib


def kernel_layout(codes: Codes) -> torch.Tensor:
    """The kernel's packing of 4-bit codes: per group of 32 inputs, 16 bytes, byte ``k``
    holding input ``k`` in its low nibble and input ``k + 16`` in its high one."""
    out_features, in_features = codes.codes.shape
    grouped = codes.codes.reshape(out_features, in_features // GROUP, 2, GROUP // 2)
    packed = grouped[:, :, 0] | (grouped[:, :, 1] << 4)
    return packed.reshape(out_features, in_features // 2).to(torch.uint8).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Decoder:
    """A model's layers as the kernel takes them: 4-bit codes, float32 norms and biases; and
    its final norm and vocabulary projection (its 8-bit codes where it has them, else its
    weight, float32 or bfloat16 as the model holds it)."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        shape: dict[str, Any],
        layers: list[dict[str, Any]],
        head: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Codes8 | None],
    ) -> None:
        self._lib = lib
        self._keep: list[torch.Tensor] = []  # every tensor the structures point into
        self._layers = (_Layer * len(layers))()
        for i, layer in enumerate(layers):
            self._layers[i].attn_norm = self._hold(layer["attn_norm"].float())
            self._layers[i].mlp_norm = self._hold(layer["mlp_norm"].float())
            for name in ("qkv", "o", "gate_up", "down"):
                codes, bias = layer[name]
                setattr(self._layers[i], name, self._q4(codes, bias))
        norm, lm_head, lm_bias, head8 = head
        self.vocab = lm_head.shape[0]
        self._model = _Model(
            layers=len(layers), hidden=shape["hidden"], heads=shape["heads"],
            kv_heads=shape["kv_heads"], head_dim=shape["head_dim"], inter=shape["inter"],
            eps=shape["eps"], layer=self._layers, norm=self._hold(norm.float()),
            lm_head=self._hold(lm_head), lm_bf16=int(lm_head.dtype == torch.bfloat16),
            lm_codes=None if head8 is None else self._hold(head8.codes),
            lm_scale=None if head8 is None else self._hold(head8.scale.float()),
            lm_bias=None if lm_bias is None else self._hold(lm_bias.float()), vocab=self.vocab,
        )  # fmt: skip

    def _hold(self, t: torch.Tensor) -> int:
        t = t.contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _q4(self, codes: Codes, bias: torch.Tensor | None) -> _Q4:
        out_features, in_features = codes.codes.shape
        return _Q4(
            codes=self._hold(kernel_layout(codes)),
            scale=self._hold(codes.scale.float()),
            low=self._hold(codes.low.float()),
            bias=None if bias is None else self._hold(bias.float()),
            out=out_features,
            inputs=in_features,
        )

    def resident(self) -> list[torch.Tensor]:
        return list(self._keep)

    def __call__(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        tables: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pool: torch.Tensor,
        chosen: torch.Tensor,
    ) -> torch.Tensor:
        """Every layer over ``x`` [tokens, hidden] (float32, contiguous; overwritten): token
        ``t`` at ``positions[t]``, its key and value written to ``slots[t]``, reading through
        block table ``tables[t]``; ``cos`` and ``sin`` [tokens, head_dim] float32. Returns
        the logits of the tokens ``chosen``, [len(chosen), vocab] float32."""
        tensors = [positions, slots, tables, cos, sin, chosen]
        positions, slots, tables, cos, sin, chosen = (t.contiguous() for t in tensors)
        logits = torch.empty(len(chosen), self.vocab)
        self._model.kv_bf16 = int(pool.dtype == torch.bfloat16)
        self._model.pool = pool.data_ptr()
        self._model.slots = pool.shape[3]
        step = _Step(
            tokens=x.shape[0], x=x.data_ptr(), pos=_ptr(positions), slot=_ptr(slots),
            table=_ptr(tables), width=tables.shape[1], cos=_ptr(cos), sin=_ptr(sin),
            outputs=len(chosen), chosen=_ptr(chosen), logits=logits.data_ptr(),
        )  # fmt: skip
        if self._lib.helexa_decode(ctypes.byref(self._model), ctypes.byref(step),
                                   torch.get_num_threads()) != 0:  # fmt: skip
            raise MemoryError("decode kernel: out of memory for its scratch")
        return logits
