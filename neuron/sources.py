"""Turn a ``ModelSpec`` into local files a model can be loaded from.

Three kinds of source: a Hugging Face repository (fetched with huggingface_hub into the cache
dir, at a revision), a local model directory, and a GGUF file (local or inside a Hugging Face
repo). A GGUF file is dequantised once and materialised into the cache as safetensors plus its
tokenizer, so every later load reads plain safetensors and takes well under a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

from helexa.modelspec import ModelSpec
from neuron.errors import LoadFailed
from neuron.model.quant import INT4_FILE, find_int4, save_int4

log = logging.getLogger(__name__)

# Bumped when what a materialised GGUF folder holds changes; older folders are redone.
# 2: the 4-bit projections' codes (int4.safetensors).
MATERIALISED_FORMAT = 2
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def resolve(spec: ModelSpec, cache_dir: Path) -> Path:
    """Return a directory holding config.json, safetensors weights and a tokenizer."""
    if spec.hf_repo:
        return _resolve_hub(spec, cache_dir)
    path = Path(spec.path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return materialise_gguf(path, cache_dir)
    if spec.gguf_file:
        gguf = path / spec.gguf_file
        if not gguf.is_file():
            raise LoadFailed(f"{gguf}: no such GGUF file")
        return materialise_gguf(gguf, cache_dir)
    if not (path / "config.json").is_file():
        raise LoadFailed(f"{path}: not a model directory (no config.json)")
    return path


def _resolve_hub(spec: ModelSpec, cache_dir: Path) -> Path:
    # Imported here so that the cache-only paths never pay for huggingface_hub's import.
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    hub_cache = cache_dir / "hub"
    revision = spec.revision or None
    try:
        if spec.gguf_file:
            gguf = hf_hub_download(
                spec.hf_repo, spec.gguf_file, revision=revision, cache_dir=hub_cache
            )
            return materialise_gguf(Path(gguf), cache_dir)
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        snapshot = snapshot_download(
            spec.hf_repo, revision=revision, cache_dir=hub_cache, allow_patterns=patterns
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise LoadFailed(f"hf:{spec.hf_repo}@{spec.revision or 'main'}: {e}") from e
    path = Path(snapshot)
    if not (path / "config.json").is_file():
        raise LoadFailed(f"hf:{spec.hf_repo}: no config.json in the repository")
    return path


def materialise_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF file once into ``cache_dir/gguf/<digest>``; later calls reuse it."""
    digest = _file_digest(gguf)
    target = cache_dir / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if _materialised(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One materialisation per file across threads and processes sharing the cache.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _materialised(target):
            return target
        started = time.monotonic()
        scratch = target.parent / f".{target.name}.partial-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            _dequantise_into(gguf, scratch)
            marker = {"source": str(gguf), "format": MATERIALISED_FORMAT}
            (scratch / ".complete").write_text(json.dumps(marker))
            shutil.rmtree(target, ignore_errors=True)
            scratch.rename(target)
        except Exception as e:
            shutil.rmtree(scratch, ignore_errors=True)
            raise LoadFailed(f"{gguf}: cannot materialise GGUF: {e}") from e
    log.info(
        "gguf materialised file=%s into=%s seconds=%.2f",
        gguf, target, time.monotonic() - started,
    )  # fmt: skip
    return target


def _dequantise_into(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Drop every trace of GGUF quantisation so the folder reloads as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # The projections that were 4-bit in the file keep their codes for the CPU's int4 kernel.
    save_int4(find_int4(model), out / INT4_FILE)


def _materialised(target: Path) -> bool:
    """Whether ``target`` holds a complete materialisation in the current layout."""
    try:
        marker = json.loads((target / ".complete").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == MATERIALISED_FORMAT


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def parameter_bytes(model_dir: Path, dtype_bytes: int | None) -> int:
    """Bytes the weights take once loaded: read from the safetensors headers, not the data.

    ``dtype_bytes`` is the size of one element in the dtype the model will be loaded in, or
    None to keep each tensor's stored dtype. 4-bit codes count as stored.
    """
    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        element = None if file.name == INT4_FILE else dtype_bytes
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count * (element or _DTYPE_BYTES.get(entry["dtype"], 4))
    if total == 0:
        raise LoadFailed(f"{model_dir}: no safetensors weights found")
    return total
