"""The engine's forward pass against transformers' own, on tiny random models.

Each supported architecture: rows of different lengths prefilled together through the paged
KV cache, decoded, joined by a new row mid-way (one that begins like an earlier prompt, so it
shares that prompt's cached blocks) and trimmed when one leaves, a verifying step with drafts
of different lengths, all through the engine's ``Runner`` as the engine drives it. Every
row's logits must match transformers' forward over that row alone.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from neuron.engine.runner import Runner
from neuron.engine.sequence import SamplingParams, Sequence
from neuron.model import quant
from neuron.model.forward import BLOCK, Forward


@pytest.fixture(autouse=True)
def inference_mode() -> Iterator[None]:
    """As the engine's step runs: the runner's tensors are inference tensors."""
    with torch.inference_mode():
        yield


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
    """A ``Runner`` over ``forward``, fed tokens as the engine feeds it."""

    def __init__(self, forward: Forward, prefix_cache: int = 1 << 20) -> None:
        self.runner = Runner("tiny", forward, torch.device("cpu"), 0, 64, prefix_cache)
        # What a fresh pool's memory may hold: a row must never read it unmasked, and the
        # masked columns must leave nothing of it.
        self.runner.pool.data[:, :, :, BLOCK:] = float("nan")
        self.seqs: list[Sequence] = []

    @property
    def rows(self) -> list[list[int]]:
        return [s.prompt_ids + s.generated for s in self.seqs]

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        seqs = [
            Sequence(str(i), list(p), SamplingParams(max_tokens=8), print, None)  # type: ignore[arg-type]
            for i, p in enumerate(prompts)
        ]
        logits = self.runner.prefill(seqs)
        self.seqs.extend(seqs)
        return logits

    def decode(self, tokens: list[int]) -> torch.Tensor:
        self.runner.accept(0, torch.tensor(tokens))
        for seq, token in zip(self.seqs, tokens, strict=True):
            seq.generated.append(token)
        return self.runner.decode()

    def verify(self, tokens: list[int], drafts: list[list[int]]) -> torch.Tensor:
        self.runner.accept(0, torch.tensor(tokens))
        for seq, token in zip(self.seqs, tokens, strict=True):
            seq.generated.append(token)
        return self.runner.verify(drafts)

    def settle(self, drafts: list[list[int]], kept: list[int]) -> None:
        self.runner.settle(kept)
        for seq, draft, n in zip(self.seqs, drafts, kept, strict=True):
            seq.generated.extend(draft[:n])

    def keep(self, keep: list[int]) -> None:
        self.runner.keep(keep)
        self.seqs = [self.seqs[i] for i in keep]


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
    system = list(range(3, 3 + 2 * BLOCK))  # two whole blocks, cached once run
    check(batch, reference, batch.prefill([[*system, 5, 6, 7], [10, 11]]), 1e-4)
    for step in range(3):
        check(batch, reference, batch.decode([20 + step, 30 + step]), 1e-4)
    # A prompt that begins like the first joins mid-way: it takes that prompt's two cached
    # blocks and runs only its own tokens. Then the first row leaves.
    hits = batch.runner.blocks.cached
    joined = batch.prefill([[*system, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    assert batch.seqs[-1].cached_tokens == 2 * BLOCK and batch.runner.blocks.cached == hits
    check(batch, reference, joined, 1e-4)
    check(batch, reference, batch.decode([50, 51, 52]), 1e-4)
    batch.keep([1, 2])
    for step in range(BLOCK + 2):  # across a block boundary in every row
        check(batch, reference, batch.decode([60 + step, 70 + step]), 1e-4)


def test_a_verifying_step_gives_each_columns_logits_and_keeps_what_was_accepted() -> None:
    model = tiny("LlamaForCausalLM")
    reference = copy.deepcopy(model)
    batch = Batch(Forward(model, {}, use_int4=False))
    batch.prefill([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]])
    batch.decode([1, 2, 3])
    drafts = [[21, 22, 23], [], [31]]
    logits = batch.verify([4, 5, 6], drafts)
    assert logits.shape[:2] == (3, 4)
    for i, (row, draft) in enumerate(zip(batch.rows, drafts, strict=True)):
        for column in range(1 + len(draft)):
            want = alone(reference, row + draft[:column])
            assert torch.allclose(logits[i, column], want, atol=1e-4), (i, column)
    # The first row keeps two of its three draft tokens, the last none: the next step runs
    # after what each kept, the rejected tokens' slots written over.
    batch.settle(drafts, [2, 0, 0])
    for step in range(3):
        check(batch, reference, batch.decode([60 + step, 70 + step, 80 + step]), 1e-4)


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
