"""The decoder forward pass the engine runs: Llama-family models, batched over a shared cache.

transformers' own forward is written for generality: per step it builds masks, walks module
hooks and issues thousands of small tensor ops, which at decode (one token per row) cost as
much as the matmuls. This one takes the weights of a loaded transformers model and runs the
same arithmetic with fused projections (one matmul for q, k and v, one for gate and up), a
preallocated KV cache written in place, attention with grouped heads (computed directly for a
decode step), and the vocabulary projection for the last position only. Projections
whose weights are exactly 4-bit run as 4-bit on the CPU (``neuron.model.quant``).

The batch layout is the engine's: every row of the cache is left-padded to a common length
(``KVCache.length``), so a decode step writes one column for all rows; each row has its own
positions and a mask of its real columns. ``tests/test_forward.py`` checks this forward
against transformers' on tiny random models of every supported architecture.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from neuron.model.quant import Codes, Linear

# Columns a cache gains beyond what it needs when it grows or merges: one copy every GROWTH
# decode steps, and never more than GROWTH columns unused per row.
GROWTH = 64
# transformers architectures this forward runs (same decoder block; qwen2 adds q/k/v biases).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class KVCache:
    """Keys and values of a batch: ``[layers, 2, rows, kv_heads, capacity, head_dim]``.

    Columns ``[0, length)`` are in use; each row's real columns are at its right end (the
    engine's left padding). Capacity grows by doubling, so appending a token is a write.
    """

    def __init__(self, data: torch.Tensor, length: int) -> None:
        self.data = data
        self.length = length

    @classmethod
    def empty(cls, like: KVCache | Forward, rows: int, capacity: int) -> KVCache:
        shape = like.cache_shape(rows, max(capacity, 16))
        return cls(torch.empty(shape, dtype=like.dtype, device=like.device), 0)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def cache_shape(self, rows: int, capacity: int) -> tuple[int, ...]:
        layers, two, _, heads, _, dim = self.data.shape
        return (layers, two, rows, heads, capacity, dim)

    @property
    def rows(self) -> int:
        return int(self.data.shape[2])

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` more columns."""
        capacity = self.data.shape[4]
        if self.length + columns <= capacity:
            return
        # Grown by a bounded step, not doubled: a batch's cache stays near its longest row.
        grown = KVCache.empty(self, self.rows, self.length + columns + GROWTH)
        grown.data[..., : self.length, :] = self.data[..., : self.length, :]
        self.data = grown.data

    def merge(self, other: KVCache) -> None:
        """Append ``other``'s rows, both right-aligned at the longer of the two lengths."""
        total = max(self.length, other.length)
        merged = KVCache.empty(self, self.rows + other.rows, total + GROWTH)
        merged.data[:, :, : self.rows, :, total - self.length : total] = self.data[
            ..., : self.length, :
        ]
        merged.data[:, :, self.rows :, :, total - other.length : total] = other.data[
            ..., : other.length, :
        ]
        merged.data[:, :, : self.rows, :, : total - self.length] = 0
        merged.data[:, :, self.rows :, :, : total - other.length] = 0
        self.data, self.length = merged.data, total

    def pack(self, columns: torch.Tensor) -> None:
        """Keep, as the only columns, those ``columns`` [rows, n] names for each row, in order."""
        layers, two, rows, heads, _, dim = self.data.shape
        n = columns.shape[1]
        packed = KVCache.empty(self, rows, n + GROWTH)
        index = columns[None, None, :, None, :, None].expand(layers, two, rows, heads, n, dim)
        packed.data[..., :n, :] = self.data.gather(4, index)
        self.data, self.length = packed.data, n

    def keep(self, rows: torch.Tensor, cut: int) -> None:
        """Keep only ``rows`` and drop the first ``cut`` columns (padding in all of them)."""
        kept = self.data.index_select(2, rows)[..., cut : self.length, :]
        self.data = kept.contiguous()
        self.length -= cut


def served_context(config: Any) -> int:
    """The longest sequence this forward serves for a model of ``config``.

    Attention here is over the whole context: a model trained with a sliding window is only
    served up to its window."""
    window: int | None = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", True):
        window = None
    return int(window or config.max_position_embeddings)


def kv_elements_per_token(config: Any) -> int:
    """Elements one token of one row takes in the KV cache (keys and values, every layer)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim


class Forward:
    """A Llama-family decoder's weights, arranged for batched decoding."""

    def __init__(self, model: Any, int4: dict[str, Codes], use_int4: bool) -> None:
        config = model.config
        inner = model.model
        self.dtype = model.dtype
        self.device = model.device
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.max_context = served_context(config)
        if config.hidden_act != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported (silu is)")
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight
        self.lm_head = Linear(model.lm_head.weight, model.lm_head.bias)
        # Rows of the logits: may be wider than the tokenizer (padded vocabularies).
        self.vocab_size = int(model.lm_head.weight.shape[0])

        def linear(prefix: str, names: tuple[str, ...]) -> Linear:
            modules = [model.get_submodule(f"{prefix}.{n}") for n in names]
            weight = (
                torch.cat([m.weight for m in modules]) if len(modules) > 1 else modules[0].weight
            )
            biases = [m.bias for m in modules]
            bias = torch.cat(biases) if all(b is not None for b in biases) else None
            parts = [int4.get(f"{prefix}.{n}") for n in names]
            codes = None
            if use_int4 and all(p is not None for p in parts):
                codes = Codes.cat([p for p in parts if p is not None])
            return Linear(weight.detach(), bias, codes)

        self.layers = []
        for i, layer in enumerate(inner.layers):
            prefix = f"model.layers.{i}"
            self.layers.append(
                _Layer(
                    layer.input_layernorm.weight,
                    linear(f"{prefix}.self_attn", ("q_proj", "k_proj", "v_proj")),
                    linear(f"{prefix}.self_attn", ("o_proj",)),
                    layer.post_attention_layernorm.weight,
                    linear(f"{prefix}.mlp", ("gate_proj", "up_proj")),
                    linear(f"{prefix}.mlp", ("down_proj",)),
                )
            )
        # The fused copies replace the model's own decoder layers.
        inner.layers = torch.nn.ModuleList()

    def cache_shape(self, rows: int, capacity: int) -> tuple[int, ...]:
        return (len(self.layers), 2, rows, self.kv_heads, capacity, self.head_dim)

    def resident_bytes(self) -> int:
        tensors = {id(t): t for t in [self.embed, self.norm, *self.lm_head.tensors()]}
        for layer in self.layers:
            for t in layer.tensors():
                tensors[id(t)] = t
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def int4_layers(self) -> int:
        return sum(
            lin.packed is not None
            for layer in self.layers
            for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
        )

    @torch.inference_mode()
    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache,
        every: bool = False,
    ) -> torch.Tensor:
        """Run ``ids`` [rows, n] at ``positions`` [rows, n] and append them to ``cache``.

        ``mask`` [rows, length + n] marks each row's real columns (1) and padding (0) once
        the new columns are appended. Returns the logits of the last column, [rows, vocab];
        with ``every`` (a decode step that verifies draft tokens), those of every new
        column, [rows, n, vocab].
        """
        rows, n = ids.shape
        cache.reserve(n)
        start, end = cache.length, cache.length + n
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        attend = self._attention_mask(mask.bool(), n)
        # A verifying step is a decode step (a few tokens per row): it runs the 4-bit codes.
        decode = n == 1 or every
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.attn_norm, self.eps)
            q, k, v = layer.qkv(h, decode).split((q_size, kv_size, kv_size), dim=-1)
            q = _rotate(q.view(rows, n, self.heads, self.head_dim).transpose(1, 2), cos, sin)
            k = _rotate(k.view(rows, n, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            keys, values = cache.data[i, 0], cache.data[i, 1]
            keys[:, :, start:end] = k
            values[:, :, start:end] = v.view(rows, n, self.kv_heads, self.head_dim).transpose(1, 2)
            a = self._attention(q, keys[:, :, :end], values[:, :, :end], attend)
            x = x + layer.o(a.transpose(1, 2).reshape(rows, n, q_size), decode)
            h = _rms_norm(x, layer.mlp_norm, self.eps)
            gate, up = layer.gate_up(h, decode).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up, decode)
        cache.length = end
        return self.lm_head(_rms_norm(x if every else x[:, -1], self.norm, self.eps))

    def _attention_mask(self, real: torch.Tensor, n: int) -> torch.Tensor:
        """For ``n`` new columns: each sees the real columns up to itself.

        One new column (a decode step): an additive mask [rows, 1, 1, columns], 0 or -inf.
        Several (prompts): a boolean one [rows, 1, n, columns] where a padding column sees
        itself, so no row of the softmax is empty (its output is never used: real columns
        never attend to padding).
        """
        if n == 1:
            bias = torch.zeros(real.shape, dtype=self.dtype, device=real.device)
            return bias.masked_fill_(~real, float("-inf"))[:, None, None, :]
        columns = real.shape[1]
        new = torch.arange(columns - n, columns, device=real.device)
        causal = torch.arange(columns, device=real.device)[None, :] <= new[:, None]
        itself = torch.arange(columns, device=real.device)[None, :] == new[:, None]
        return (real[:, None, None, :] & causal[None, None]) | itself[None, None]

    def _attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attend: torch.Tensor
    ) -> torch.Tensor:
        """Attention of ``q`` [rows, heads, n, dim] over the cache's columns, grouped heads.

        A decode step computes it directly (query heads sharing a key head in one matmul):
        ``scaled_dot_product_attention``'s CPU kernel costs 6-12x more for a single query
        at 8 rows and more. Prompts go through that kernel.
        """
        rows, heads, n, dim = q.shape
        if n > 1:
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=attend, enable_gqa=self.kv_heads != heads
            )
        grouped = q.reshape(rows, self.kv_heads, heads // self.kv_heads, dim)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)) * dim**-0.5 + attend
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, values).reshape(rows, heads, 1, dim)


class _Layer:
    def __init__(
        self,
        attn_norm: torch.Tensor,
        qkv: Linear,
        o: Linear,
        mlp_norm: torch.Tensor,
        gate_up: Linear,
        down: Linear,
    ) -> None:
        self.attn_norm, self.qkv, self.o = attn_norm, qkv, o
        self.mlp_norm, self.gate_up, self.down = mlp_norm, gate_up, down

    def tensors(self) -> list[torch.Tensor]:
        found = [self.attn_norm, self.mlp_norm]
        for lin in (self.qkv, self.o, self.gate_up, self.down):
            found.extend(lin.tensors())
        return found


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalise in float32, scale in the model's dtype.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
