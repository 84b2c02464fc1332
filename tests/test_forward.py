"""The engine's forward pass against transformers' own, on tiny random models.

Each supported architecture: rows of different lengths, left-padded, prefilled together,
decoded, joined by a new row mid-way and trimmed when one leaves, exactly as the engine
drives it. Every row's logits must match transformers' forward over that row alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from neuron.model import quant
from neuron.model.forward import Forward, KVCache

SIZES = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny(architecture: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if architecture == "LlamaForCausalLM":
        config = transformers.LlamaConfig(**SIZES, rms_norm_eps=1e-5)
    elif architecture == "Qwen2ForCausalLM":
        config = transformers.Qwen2Config(**SIZES, use_sliding_window=False)
    else:
        config = transformers.MistralConfig(**SIZES, sliding_window=None)
    config.architectures = [architecture]
    model = getattr(transformers, architecture)(config).eval()
    if architecture == "Qwen2ForCausalLM":  # random biases, so a dropped one shows
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_()
    return model


def alone(reference: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """transformers' logits for the last of ``tokens``, one row, no padding."""
    with torch.inference_mode():
        return reference(input_ids=torch.tensor([tokens])).logits[0, -1]


class Batch:
    """The engine's bookkeeping for a batch: rows, their tokens, mask, positions, cache."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.rows: list[list[int]] = []
        self.cache: KVCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = KVCache.empty(self.forward, len(prompts), longest + 2)
        logits = self.forward(ids, positions, mask, cache)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            total = max(self.mask.shape[1], mask.shape[1])
            self.cache.merge(cache)
            self.mask = torch.cat(
                [
                    F.pad(self.mask, (total - self.mask.shape[1], 0)),
                    F.pad(mask, (total - mask.shape[1], 0)),
                ]
            )
        self.rows.extend(list(p) for p in prompts)
        return logits

    def decode(self, tokens: list[int]) -> torch.Tensor:
        assert self.cache is not None
        positions = torch.tensor([[len(r)] for r in self.rows])
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], 1)
        for row, token in zip(self.rows, tokens, strict=True):
            row.append(token)
        return self.forward(torch.tensor(tokens)[:, None], positions, self.mask, self.cache)

    def keep(self, keep: list[int]) -> None:
        assert self.cache is not None
        mask = self.mask[keep]
        cut = int(mask.any(0).nonzero()[0])
        self.cache.keep(torch.tensor(keep), cut)
        self.mask = mask[:, cut:]
        self.rows = [self.rows[i] for i in keep]


def check(batch: Batch, reference: torch.nn.Module, logits: torch.Tensor, atol: float) -> None:
    # Logits are for the rows just run: every row after a decode step, new ones after a join.
    for row, got in zip(batch.rows[len(batch.rows) - len(logits) :], logits, strict=True):
        want = alone(reference, row)
        assert torch.allclose(got.float(), want.float(), atol=atol), (got - want).abs().max()


@pytest.mark.parametrize(
    "architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"]
)
def test_forward_matches_transformers_through_join_and_leave(architecture: str) -> None:
    model = tiny(architecture)
    reference = copy.deepcopy(model)
    forward = Forward(model, {}, use_int4=False)
    batch = Batch(forward)
    check(batch, reference, batch.prefill([[5, 6, 7, 8, 9], [10, 11]]), 1e-4)
    for step in range(3):
        check(batch, reference, batch.decode([20 + step, 30 + step]), 1e-4)
    # A longer prompt joins mid-way, then the first row leaves.
    check(batch, reference, batch.prefill([[40, 41, 42, 43, 44, 45, 46, 47, 48]]), 1e-4)
    check(batch, reference, batch.decode([50, 51, 52]), 1e-4)
    batch.keep([1, 2])
    for step in range(3):  # enough to grow the cache past its first capacity
        check(batch, reference, batch.decode([60 + step, 70 + step]), 1e-4)


def four_bit(model: torch.nn.Module) -> None:
    """Make every decoder projection's weight exactly 4-bit groups, as a GGUF Q4_1 holds."""
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in [*layer.self_attn.children(), *layer.mlp.children()]:
                if isinstance(proj, torch.nn.Linear):
                    w = proj.weight.reshape(proj.out_features, -1, quant.GROUP)
                    low = w.amin(-1, keepdim=True)
                    scale = (w.amax(-1, keepdim=True) - low) / 15
                    codes = torch.round((w - low) / scale)
                    proj.weight.copy_((codes * scale + low).reshape_as(proj.weight))


def test_four_bit_weights_are_found_saved_and_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if not quant.int4_kernel_usable(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this torch has no CPU int4 kernel")
    model = tiny("LlamaForCausalLM")
    four_bit(model)
    found = quant.find_int4(model)
    # Every projection of both layers, and not the embedding or the random lm_head.
    assert len(found) == 2 * 7
    assert all(name.startswith("model.layers.") for name in found)
    quant.save_int4(found, tmp_path / quant.INT4_FILE)
    loaded = quant.load_int4(tmp_path)
    assert loaded.keys() == found.keys()
    for name, codes in found.items():
        assert torch.equal(loaded[name].codes, codes.codes)
        assert torch.equal(loaded[name].scale, codes.scale)

    reference = copy.deepcopy(model).to(torch.float32)
    dense = Forward(copy.deepcopy(model).to(torch.bfloat16), {}, use_int4=False)
    packed = Forward(model.to(torch.bfloat16), loaded, use_int4=True)
    assert dense.int4_layers() == 0 and packed.int4_layers() == 2 * 4
    batches = [Batch(dense), Batch(packed)]
    for b in batches:  # prompts run dense; decode steps of few rows run the 4-bit kernel
        b.prefill([[1, 2, 3, 4], [5, 6]])
    for step in range(3):
        got = [b.decode([7 + step, 8 + step]) for b in batches]
        # bf16 rounding is ~0.003 here; wrong codes or scales are off by ~0.4.
        assert torch.allclose(got[0].float(), got[1].float(), atol=0.02)
        check(batches[1], reference, got[1], atol=0.02)


def test_a_model_that_is_not_four_bit_is_left_dense() -> None:
    model = tiny("LlamaForCausalLM")
    assert quant.find_int4(model) == {}
