"""The decoder forward pass the engine runs: Llama-family models, batched over a paged cache.

transformers' own forward is written for generality: per step it builds masks, walks module
hooks and issues thousands of small tensor ops, which at decode (one token per row) cost as
much as the matmuls. This one takes the weights of a loaded transformers model and runs the
same arithmetic with fused projections (one matmul for q, k and v, one for gate and up), keys
and values written in place into a paged pool (``KVPool``), attention with grouped heads
(computed directly for a decode or verifying step), and the vocabulary projection for the
last position only. Projections whose weights are exactly 4-bit run as 4-bit on the CPU
(``neuron.model.quant``): where every layer's are, a decode step runs in one call of the CPU
kernel (``neuron.model.kernel``), and prompts stay torch's.

The cache is paged, as vLLM's: the pool is fixed-size blocks of ``BLOCK`` tokens, and each
row reads and writes its tokens through its own block table, so a batch holds the memory of
the tokens it has, and rows share the blocks of a common prompt beginning. The caller gives
each new token's slot (``KVPool.slots``) and each row's block table; a step gathers the
rows' blocks whole, and a column is seen by the new tokens at positions at or after its own. ``tests/test_forward.py`` checks this forward against
transformers' on tiny random models of every supported architecture.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from neuron.devices import cpu_has_fast_bf16
from neuron.model import kernel
from neuron.model.quant import Codes, Codes8, Linear, int4_kernel_usable

# Tokens per block of the paged KV cache (vLLM's default): the granularity of the memory a
# row holds and of the prompt beginnings rows share.
BLOCK = 16
# transformers architectures this forward runs (same decoder block; qwen2 adds q/k/v biases).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class KVPool:
    """Keys and values in blocks: ``[layers, 2, kv_heads, blocks * BLOCK, head_dim]``.

    Slot ``b * BLOCK + i`` is token ``i`` of block ``b``. Block 0 is scratch: it is never
    handed out, padding writes there and reads from there (masked), and it is zeroed so that
    what padding reads is finite. The rest is allocated untouched: on a CPU a block's pages
    are taken only once it is first written.
    """

    def __init__(self, like: Forward, blocks: int) -> None:
        shape = (len(like.layers), 2, like.kv_heads, blocks * BLOCK, like.head_dim)
        self.data = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.data[:, :, :, :BLOCK] = 0
        self.blocks = blocks

    def blocks_of(self, layer: int, kv: int) -> torch.Tensor:
        """Keys (``kv`` 0) or values (1) of ``layer`` by block: [kv_heads, blocks, BLOCK * dim]."""
        heads, _, dim = self.data.shape[2:]
        return self.data[layer, kv].view(heads, self.blocks, BLOCK * dim)

    @staticmethod
    def slots(tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The slots of ``positions`` [rows, n] through each row's block table ``tables``
        [rows, blocks] (a table padded with block 0 maps what it pads to scratch)."""
        return tables.gather(1, positions // BLOCK) * BLOCK + positions % BLOCK


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

    def __init__(
        self,
        model: Any,
        int4: dict[str, Codes],
        use_int4: bool,
        decode_kernel: bool = True,
        head8: Codes8 | None = None,
    ) -> None:
        """``int4``: the codes of the projections that are exactly 4-bit. With ``use_int4``,
        decode steps run them: in the CPU kernel where every layer has them (and
        ``decode_kernel``, and it builds here), else in torch's int4 matmul where it pays.
        ``head8``: the vocabulary projection's 8-bit codes, which the kernel then runs."""
        config = model.config
        inner = model.model
        self.dtype = model.dtype
        self.device = model.device
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.max_context = served_context(config)
        # A decode step's attention runs in float32 on a CPU: its batched matmuls in 16 bits
        # take 2.5-18x as long there (no native 16-bit path on most CPUs), the casts less.
        self.attention_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        if config.hidden_act != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported (silu is)")
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight
        upcast = (
            self.device.type == "cpu"
            and self.dtype in (torch.bfloat16, torch.float16)
            and not cpu_has_fast_bf16()
        )
        self.lm_head = Linear(model.lm_head.weight, model.lm_head.bias, upcast=upcast)
        # Rows of the logits: may be wider than the tokenizer (padded vocabularies).
        self.vocab_size = int(model.lm_head.weight.shape[0])

        projections = {
            "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
            "o": ("self_attn", ("o_proj",)),
            "gate_up": ("mlp", ("gate_proj", "up_proj")),
            "down": ("mlp", ("down_proj",)),
        }

        def fused(i: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None, Codes | None]:
            """The weight, bias and codes (or None) of layer ``i``'s projection ``name``."""
            block, names = projections[name]
            prefix = f"model.layers.{i}.{block}"
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
            return weight.detach(), bias, codes

        weights = [{n: fused(i, n) for n in projections} for i in range(len(inner.layers))]
        self.kernel: kernel.Decoder | None = None
        lib = None
        if (
            decode_kernel
            and self.device.type == "cpu"
            and self.dtype in (torch.float32, torch.bfloat16)
            and all(w[n][2] is not None for w in weights for n in projections)
        ):
            lib = kernel.library()
        if lib is not None:
            shape = {
                "hidden": config.hidden_size, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "inter": config.intermediate_size, "eps": self.eps,
            }  # fmt: skip
            self.kernel = kernel.Decoder(
                lib,
                shape,
                [
                    {
                        "attn_norm": layer.input_layernorm.weight,
                        "mlp_norm": layer.post_attention_layernorm.weight,
                        **{n: (w[n][2], w[n][1]) for n in projections},
                    }
                    for layer, w in zip(inner.layers, weights, strict=True)
                ],
                (self.norm, self.lm_head.weight, self.lm_head.bias, head8),
            )
        # torch's int4 matmul serves decode steps where the kernel does not.
        torch_int4 = self.kernel is None and int4_kernel_usable(self.device, self.dtype)

        def linear(w: tuple[torch.Tensor, torch.Tensor | None, Codes | None]) -> Linear:
            return Linear(w[0], w[1], w[2] if torch_int4 else None, upcast)

        self.layers = [
            _Layer(
                layer.input_layernorm.weight,
                linear(w["qkv"]),
                linear(w["o"]),
                layer.post_attention_layernorm.weight,
                linear(w["gate_up"]),
                linear(w["down"]),
            )
            for layer, w in zip(inner.layers, weights, strict=True)
        ]
        # The fused copies replace the model's own decoder layers.
        inner.layers = torch.nn.ModuleList()

    def resident_bytes(self) -> int:
        tensors = {id(t): t for t in [self.embed, self.norm, *self.lm_head.tensors()]}
        for t in self.kernel.resident() if self.kernel is not None else []:
            tensors[id(t)] = t
        for layer in self.layers:
            for t in layer.tensors():
                tensors[id(t)] = t
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def decode_path(self) -> str:
        """How decode steps run: ``kernel``, ``int4`` (torch's int4 matmul) or ``dense``."""
        if self.kernel is not None:
            return "kernel"
        return "int4" if self.int4_layers() else "dense"

    def int4_layers(self) -> int:
        """Projections whose decode steps run 4-bit (in the kernel, or torch's matmul)."""
        if self.kernel is not None:
            return 4 * len(self.layers)
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
        slots: torch.Tensor,
        tables: torch.Tensor,
        pool: KVPool,
        every: bool = False,
    ) -> torch.Tensor:
        """Run ``ids`` [rows, n] at ``positions`` [rows, n], writing their keys and values to
        ``slots`` [rows, n] of ``pool``.

        ``tables`` [rows, blocks] is each row's block table: the blocks of the columns it
        attends to, in order (column ``j`` holds position ``j``, the new tokens' among them;
        block 0 pads a shorter table). A new token sees the columns up to its own position.
        Padding tokens write to scratch (block 0) and their outputs are never used. Returns
        the logits of the last column, [rows, vocab]; with ``every`` (a decode step that
        verifies draft tokens), those of every new column, [rows, n, vocab].
        """
        rows, n = ids.shape
        if self.kernel is not None and (n == 1 or every):
            return self._kernel_step(ids, positions, slots, tables, pool.data, every=every)
        columns = tables.shape[1] * BLOCK
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [rows, n, 1, dim]: every head alike
        # Column j is seen by a new token at position p when j <= p: [rows, n, columns].
        sees = torch.arange(columns, device=ids.device)[None, None, :] <= positions[:, :, None]
        # A decode step, or a verifying one (a few tokens per row): direct attention and the
        # 4-bit codes. Prompts: the fused kernel.
        decode = n == 1 or every
        attend = self._decode_mask(sees) if decode else sees[:, None]
        write, read = slots.reshape(-1), tables.reshape(-1)
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.attn_norm, self.eps)
            qkv = layer.qkv(h, decode).view(rows, n, heads + 2 * kv_heads, dim)
            # Queries and keys rotated together: [rows, n, heads + kv_heads, dim].
            qk = _rotate(qkv[:, :, : heads + kv_heads], cos, sin)
            q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads :]
            keys, values = pool.data[i, 0], pool.data[i, 1]  # [kv_heads, slots, dim]
            keys.index_copy_(1, write, k.reshape(rows * n, kv_heads, dim).transpose(0, 1))
            values.index_copy_(1, write, v.reshape(rows * n, kv_heads, dim).transpose(0, 1))
            # Whole blocks gathered (a block's columns are contiguous per head).
            shape = (kv_heads, rows, columns, dim)
            seen_keys = pool.blocks_of(i, 0).index_select(1, read).view(shape)
            seen_values = pool.blocks_of(i, 1).index_select(1, read).view(shape)
            a = self._attention(q, seen_keys, seen_values, attend, decode)
            x = x + layer.o(a, decode)
            h = _rms_norm(x, layer.mlp_norm, self.eps)
            gate, up = layer.gate_up(h, decode).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up, decode)
        return self.lm_head(_rms_norm(x if every else x[:, -1], self.norm, self.eps))

    def _kernel_step(
        self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
        tables: torch.Tensor, pool: torch.Tensor, *, every: bool,
    ) -> torch.Tensor:  # fmt: skip
        """``__call__``'s decode or verifying step in the CPU kernel: the layers in float32,
        each new token attending through its row's block table."""
        assert self.kernel is not None
        rows, n = ids.shape
        x = F.embedding(ids.reshape(-1), self.embed).float()  # [tokens, hidden]
        cos, sin = self.rotary(x, positions.reshape(1, -1))
        tokens = torch.arange(rows * n)
        logits = self.kernel(
            x,
            positions.reshape(-1),
            slots.reshape(-1),
            tables.repeat_interleave(n, 0) if n > 1 else tables,
            cos[0],
            sin[0],
            pool,
            tokens if every else tokens[n - 1 :: n],
        )
        return logits.view(rows, n, -1) if every else logits

    def _decode_mask(self, sees: torch.Tensor) -> torch.Tensor:
        """``sees`` as the direct attention adds it: [1, rows, groups * n, columns], 0 or -inf
        (each query head of a group at each new token)."""
        rows, n, columns = sees.shape
        groups = self.heads // self.kv_heads
        bias = torch.zeros(sees.shape, dtype=self.attention_dtype, device=sees.device)
        bias.masked_fill_(~sees, float("-inf"))
        return bias[:, None].expand(rows, groups, n, columns).reshape(1, rows, groups * n, columns)

    def _attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attend: torch.Tensor,
        decode: bool,
    ) -> torch.Tensor:
        """Attention of ``q`` [rows, n, heads, dim] over ``keys`` and ``values``
        [kv_heads, rows, columns, dim]; returns [rows, n, heads * dim].

        A decode or verifying step computes it directly (the query heads sharing a key head
        in one matmul, per key head and row): ``scaled_dot_product_attention``'s CPU kernel
        costs 6-12x more for a single query at 8 rows and more, and one path for both keeps a
        verifying step's arithmetic a decode step's. Prompts go through that kernel.
        """
        rows, n, heads, dim = q.shape
        if not decode:
            a = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                keys.transpose(0, 1),
                values.transpose(0, 1),
                attn_mask=attend,
                enable_gqa=self.kv_heads != heads,
            )
            return a.transpose(1, 2).reshape(rows, n, heads * dim)
        groups = heads // self.kv_heads
        work = self.attention_dtype
        # [rows, n, kv_heads, groups, dim] -> [kv_heads, rows, groups, n, dim], groups * n
        # queries per key head and row.
        grouped = q.reshape(rows, n, self.kv_heads, groups, dim).permute(2, 0, 3, 1, 4)
        grouped = grouped.reshape(self.kv_heads, rows, groups * n, dim).to(work)
        scores = torch.matmul(grouped, keys.to(work).transpose(-1, -2)) * dim**-0.5 + attend
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(work)
        a = torch.matmul(probs, values.to(work))  # [kv_heads, rows, groups * n, dim]
        a = a.view(self.kv_heads, rows, groups, n, dim).permute(1, 3, 0, 2, 4)
        return a.reshape(rows, n, heads * dim).to(q.dtype)


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
    # As transformers' LlamaRMSNorm: normalise in float32, scale in the model's dtype (the
    # fused kernel, to the same bits: fewer operators a step).
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
