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
from neuron.loadpolicy import check_download_fits, free_disk
from neuron.model.quant import INT4_FILE, find_int4, save_int4

log = logging.getLogger(__name__)

# Bumped when what a materialised GGUF folder holds changes; older folders are redone.
# 2: the 4-bit projections' codes (int4.safetensors).
MATERIALISED_FORMAT = 2
# The files of a Hugging Face repository a load fetches (without a gguf_file).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# Seconds to wait for the Hub's metadata.
HUB_TIMEOUT = 10.0
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def resolve(spec: ModelSpec, cache_dir: Path, device_free: int | None = None) -> Path:
    """Return a directory holding config.json, safetensors weights and a tokenizer.

    A Hugging Face source is fetched only if its files fit on the cache's disk and in
    ``device_free`` bytes (None: not checked), by the sizes the Hub's metadata gives. A local
    source is read at its real path, the one ``loadpolicy.check_source`` allowed.
    """
    if spec.hf_repo:
        return _resolve_hub(spec, cache_dir, device_free)
    path = Path(spec.path).expanduser().resolve()
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


def _resolve_hub(spec: ModelSpec, cache_dir: Path, device_free: int | None) -> Path:
    # Imported here so that the cache-only paths never pay for huggingface_hub's import.
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    hub_cache = cache_dir / "hub"
    revision = spec.revision or None
    where = f"hf:{spec.hf_repo}@{spec.revision or 'main'}"
    # Without the sizes from the Hub's metadata nothing is fetched: only the cache is used.
    unsized = ""
    if not constants.HF_HUB_OFFLINE:
        try:
            info = HfApi().model_info(
                spec.hf_repo, revision=revision, files_metadata=True, timeout=HUB_TIMEOUT
            )
        except Exception as e:  # unreachable (its HTTP client's errors), unknown, gated
            unsized = f" (no sizes from the Hub, so only the cache was tried: {e})"
        else:
            weights, download = _hub_sizes(info, spec, hub_cache)
            check_download_fits(
                where, download, weights, spec.dtype, free_disk(hub_cache), device_free
            )
    local_only = constants.HF_HUB_OFFLINE or bool(unsized)
    try:
        if spec.gguf_file:
            gguf = hf_hub_download(
                spec.hf_repo,
                spec.gguf_file,
                revision=revision,
                cache_dir=hub_cache,
                local_files_only=local_only,
            )
            return materialise_gguf(Path(gguf), cache_dir)
        snapshot = snapshot_download(
            spec.hf_repo,
            revision=revision,
            cache_dir=hub_cache,
            allow_patterns=HUB_PATTERNS,
            local_files_only=local_only,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise LoadFailed(f"{where}: {e}{unsized}") from e
    path = Path(snapshot)
    if not (path / "config.json").is_file():
        raise LoadFailed(f"hf:{spec.hf_repo}: no config.json in the repository")
    return path


def _hub_sizes(info: Any, spec: ModelSpec, hub_cache: Path) -> tuple[int, int]:
    """Bytes of the repository's files a load uses, and of those not in the cache yet."""
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import filter_repo_objects

    siblings = info.siblings or []
    if spec.gguf_file:
        files = [s for s in siblings if s.rfilename == spec.gguf_file]
    else:
        files = list(filter_repo_objects(siblings, allow_patterns=HUB_PATTERNS, key=_name))
    # The cache keeps each file once, named by its etag: the LFS sha256, else the git blob id.
    blobs = hub_cache / repo_folder_name(repo_id=spec.hf_repo, repo_type="model") / "blobs"
    total = missing = 0
    for file in files:
        size = file.size or (file.lfs.size if file.lfs else 0)
        total += size
        etag = file.lfs.sha256 if file.lfs else file.blob_id
        if not etag or not (blobs / etag).is_file():
            missing += size
    return total, missing


def _name(sibling: Any) -> str:
    return str(sibling.rfilename)


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
