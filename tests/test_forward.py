"""The engine's forward pass against transformers' own, on tiny random models.

Each supported architecture: rows of different lengths prefilled together through the paged
KV cache, decoded, joined by a new row mid-way (one that begins like an earlier prompt, so it
shares that prompt's cached blocks) and trimmed when one leaves, a verifying step with drafts
of different lengths, all through the engine's ``Runner`` as the engine drives it. Every
row's logits must match transformers' forward over that row alone.

Each way a decode step runs: torch's dense arithmetic, and on models whose projections are
4-bit groups, the CPU kernel (``neuron.model.kernel``, float32 and bfloat16 models) and
torch's int4 matmul. The kernel's arithmetic is a token's own: the same bits alone or in any
batch, on any number of threads, decoded or verified.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from neuron.engine.runner import Runner
from neuron.engine.sequence import SamplingParams, Sequence
from neuron.model import kernel, quant
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


ARCHITECTURES = ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"]
# How a decode step runs: (the model's dtype, the 4-bit codes given, the kernel allowed, the
# vocabulary projection 8-bit), and how close to transformers' float32 logits it must come.
# bfloat16 rounds its weights and prompts' activations (~0.003 here); a wrong code, scale or
# column is off by ~0.4.
PATHS = {
    "dense": (torch.float32, False, False, False, 1e-4),
    "kernel": (torch.float32, True, True, False, 1e-4),
    "kernel-8bit-head": (torch.float32, True, True, True, 1e-4),
    "kernel-bf16": (torch.bfloat16, True, True, False, 0.02),
    "int4-bf16": (torch.bfloat16, True, False, False, 0.02),
}


def forward_for(architecture: str, path: str) -> tuple[Forward, torch.nn.Module, float]:
    """The forward of a tiny model taking ``path``, its float32 reference, the tolerance."""
    dtype, int4, allow_kernel, eight, atol = PATHS[path]
    model = tiny(architecture)
    if int4:
        four_bit(model)
    if eight:
        eight_bit_head(model)
    reference = copy.deepcopy(model)
    codes = quant.find_int4(model) if int4 else {}
    head8 = quant.codes8_of(model.lm_head.weight) if eight else None
    assert (head8 is not None) == eight
    forward = Forward(model.to(dtype), codes, int4, allow_kernel, head8)
    want = {"dense": "dense", "int4-bf16": "int4"}.get(path, "kernel")
    if path == "int4-bf16" and not quant.int4_kernel_usable(torch.device("cpu"), dtype):
        pytest.skip("this torch has no CPU int4 kernel")
    # A neuron host has a C compiler (the RPM requires one; `make` installs it): the kernel
    # path failing to build is a failure here, not a skip.
    assert forward.decode_path() == want, kernel.library()
    return forward, reference, atol


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_matches_transformers_through_join_and_leave(architecture: str, path: str) -> None:
    forward, reference, atol = forward_for(architecture, path)
    batch = Batch(forward)
    system = list(range(3, 3 + 2 * BLOCK))  # two whole blocks, cached once run
    check(batch, reference, batch.prefill([[*system, 5, 6, 7], [10, 11]]), atol)
    for step in range(3):
        check(batch, reference, batch.decode([20 + step, 30 + step]), atol)
    # A prompt that begins like the first joins mid-way: it takes that prompt's two cached
    # blocks and runs only its own tokens. Then the first row leaves.
    hits = batch.runner.blocks.cached
    joined = batch.prefill([[*system, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    assert batch.seqs[-1].cached_tokens == 2 * BLOCK and batch.runner.blocks.cached == hits
    check(batch, reference, joined, atol)
    check(batch, reference, batch.decode([50, 51, 52]), atol)
    batch.keep([1, 2])
    for step in range(BLOCK + 2):  # across a block boundary in every row
        check(batch, reference, batch.decode([60 + step, 70 + step]), atol)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_verifying_step_gives_each_columns_logits_and_keeps_what_was_accepted(
    path: str,
) -> None:
    forward, reference, atol = forward_for("LlamaForCausalLM", path)
    batch = Batch(forward)
    batch.prefill([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]])
    batch.decode([1, 2, 3])
    drafts = [[21, 22, 23], [], [31]]
    logits = batch.verify([4, 5, 6], drafts)
    assert logits.shape[:2] == (3, 4)
    for i, (row, draft) in enumerate(zip(batch.rows, drafts, strict=True)):
        for column in range(1 + len(draft)):
            want = alone(reference, row + draft[:column])
            assert torch.allclose(logits[i, column].float(), want, atol=atol), (i, column)
    # The first row keeps two of its three draft tokens, the last none: the next step runs
    # after what each kept, the rejected tokens' slots written over.
    batch.settle(drafts, [2, 0, 0])
    for step in range(3):
        check(batch, reference, batch.decode([60 + step, 70 + step, 80 + step]), atol)


@pytest.mark.parametrize("path", ["kernel", "kernel-bf16"])
def test_the_kernel_gives_a_token_the_same_bits_in_any_batch_thread_count_or_step(
    path: str,
) -> None:
    """A row decoded alone on one thread, the same row in a batch of rows of other lengths on
    two threads, and the same tokens verified in one step as drafts: identical logits."""
    forward, _, _ = forward_for("Qwen2ForCausalLM", path)
    prompt, then = [5, 6, 7, 8, 9, 10, 11], [21, 22, 23, 24, 25]
    others = [[40 + i for i in range(n)] for n in (1, 3, BLOCK + 2, 2 * BLOCK + 5)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = Batch(forward)
        single.prefill([prompt])
        alone_logits = [single.decode([t])[0] for t in then]
        torch.set_num_threads(2)
        crowd = Batch(forward)
        crowd.prefill([others[0], others[1], prompt, others[2], others[3]])
        in_batch = [crowd.decode([t if i == 2 else 60 + i for i in range(5)])[2] for t in then]
        drafted = Batch(forward)
        drafted.prefill([others[3], prompt])
        verified = drafted.verify([70, then[0]], [[71, 72], then[1:]])[1]
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(alone_logits, in_batch, verified, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_without_a_compiler_decode_steps_stay_torchs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No C compiler on the host: the neuron logs it and runs its decode steps in torch."""
    import subprocess
    import sys

    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from tests.test_forward import tiny, four_bit\n"
        "from neuron.model import quant\n"
        "from neuron.model.forward import Forward\n"
        "model = tiny('LlamaForCausalLM'); four_bit(model)\n"
        "print(Forward(model, quant.find_int4(model), True).decode_path())\n"
    )
    env = {"PATH": str(tmp_path), "CC": str(tmp_path / "no-cc"), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "dense"
    assert "decode kernel not built" in done.stderr


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


def eight_bit_head(model: torch.nn.Module) -> None:
    """Make the vocabulary projection's weight exactly 8-bit groups, as GGUF's Q8_0."""
    with torch.no_grad():
        w = model.lm_head.weight.reshape(model.lm_head.out_features, -1, quant.GROUP)
        scale = w.abs().amax(-1, keepdim=True) / 127
        model.lm_head.weight.copy_(
            (torch.round(w / scale) * scale).reshape_as(model.lm_head.weight)
        )


def test_an_eight_bit_vocabulary_projection_is_found_and_saved(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny("LlamaForCausalLM")
    assert quant.codes8_of(model.lm_head.weight) is None  # random weights are not 8-bit
    eight_bit_head(model)
    head = quant.codes8_of(model.lm_head.weight)
    assert head is not None and int(head.codes.abs().max()) == 127
    rebuilt = (
        head.codes.float().reshape(head.codes.shape[0], -1, quant.GROUP) * head.scale[..., None]
    )
    assert torch.allclose(rebuilt.reshape_as(model.lm_head.weight), model.lm_head.weight)
    quant.save_int8({"lm_head": head}, tmp_path / quant.INT8_FILE)
    loaded = quant.load_int8(tmp_path)["lm_head"]
    assert torch.equal(loaded.codes, head.codes) and torch.equal(loaded.scale, head.scale)


def test_four_bit_weights_are_found_and_saved(tmp_path) -> None:  # type: ignore[no-untyped-def]
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


def test_a_model_that_is_not_four_bit_is_left_dense() -> None:
    model = tiny("LlamaForCausalLM")
    assert quant.find_int4(model) == {}
