"""Models with random weights, built from published configs, for hosts without the demo GGUF.

The GPU check runs where only the source tree travels (no GGUF, no network), so its models are
made there: a published architecture's shape with random bf16 weights and the demo model's
tokenizer (its vocabulary replaces the published one, so every token the model can produce
has text). ``build`` writes a model directory neuron loads like any other; built models are
kept under ``BUILT`` and reused.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

from tests.harness import DEMO_GGUF, ROOT, SHARED_CACHE

# What ``make gpu-wheels`` carries beside the wheels: the demo tokenizer, read out of the GGUF.
TOKENIZER_BUNDLE = ROOT / ".gpu/tokenizer"
BUILT = ROOT / ".cache/random-models"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

# Published configs (the fields that shape the network), by the name of the model they copy.
SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-0.5B-Instruct: 494M parameters with its 151,936-token vocabulary.
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "use_sliding_window": False,
    },
    # Qwen/Qwen2.5-1.5B-Instruct: 1.54B parameters with its vocabulary.
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "use_sliding_window": False,
    },
    # A Llama of a few million parameters: compares devices and dtypes in seconds. Its
    # weights are drawn wide (initializer_range) so that greedy choices are not near-ties.
    "tiny-llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "initializer_range": 0.5,
    },
}


def tokenizer_dir() -> Path:
    """The demo tokenizer: the carried bundle where the GGUF is absent (the GPU host), else
    the tokenizer of the demo GGUF as the tests materialise it."""
    if (TOKENIZER_BUNDLE / "tokenizer.json").exists():
        return TOKENIZER_BUNDLE
    if not DEMO_GGUF.exists():
        raise FileNotFoundError(f"neither {TOKENIZER_BUNDLE} nor {DEMO_GGUF}: run `make model`")
    from neuron.sources import materialise_gguf

    return materialise_gguf(DEMO_GGUF, SHARED_CACHE)


def extract_tokenizer(dest: Path) -> Path:
    """Write the demo tokenizer (no weights) into ``dest``: what the GPU host builds with."""
    dest.mkdir(parents=True, exist_ok=True)
    source = tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, dest / name)
    return dest


def model_config(shape: str, tokenizer: Any, dtype: str = "bfloat16") -> Any:
    """The transformers config of ``shape`` with the demo tokenizer's vocabulary and ids."""
    from transformers import AutoConfig

    fields = dict(SHAPES[shape])
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        **fields,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    return config


def parameter_count(shape: str) -> int:
    """Parameters of ``shape`` with the demo tokenizer's vocabulary (on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape, tokenizer))
    return sum(p.numel() for p in model.parameters())


def build(
    shape: str,
    dest: Path | None = None,
    dtype: str = "bfloat16",
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """A model directory of ``shape`` with random weights in ``dtype``, drawn on ``device``
    (a GPU draws a billion parameters in a blink) from ``seed``; kept and reused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = dest or BUILT / f"{shape}-{dtype}-{seed}"
    if (dest / ".complete").exists():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    config = model_config(shape, tokenizer, dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    del model
    (partial / ".complete").write_text(json.dumps({"shape": shape, "dtype": dtype, "seed": seed}))
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


def oversized(shape: str, dest: Path, weight_bytes: int) -> Path:
    """A model directory of ``shape`` whose safetensors header declares ``weight_bytes`` of
    bf16 weights that are not there: what a neuron reads to place a model, with nothing to
    load. A neuron must refuse it for room before touching the (missing) data."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    dest.mkdir(parents=True, exist_ok=True)
    model_config(shape, tokenizer).save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    rows = weight_bytes // (2 * 4096) + 1
    header = json.dumps(
        {
            "model.embed_tokens.weight": {
                "dtype": "BF16",
                "shape": [rows, 4096],
                "data_offsets": [0, rows * 4096 * 2],
            }
        }
    ).encode()
    with open(dest / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    return dest
