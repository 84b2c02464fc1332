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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from helexa.modelspec import ModelSpec
from neuron import metrics
from neuron.errors import LoadFailed
from neuron.loadpolicy import check_download_fits, free_disk
from neuron.loadprogress import BYTES, DOWNLOADING, MATERIALISING, TENSORS, LoadProgress
from neuron.model.quant import INT4_FILE, INT8_FILE, codes8_of, find_int4, save_int4, save_int8

log = logging.getLogger(__name__)

# Bumped when what a materialised GGUF folder holds changes; older folders are redone.
# 2: the 4-bit projections' codes (int4.safetensors). 3: the vocabulary projection's 8-bit
# codes (int8.safetensors).
MATERIALISED_FORMAT = 3
# The files of a Hugging Face repository a load fetches (without a gguf_file).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# Seconds to wait for the Hub's metadata.
HUB_TIMEOUT = 10.0
# Seconds between two looks at the size of a download's files.
DOWNLOAD_POLL = 0.5
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def resolve(
    spec: ModelSpec,
    cache_dir: Path,
    device_free: int | None = None,
    progress: LoadProgress | None = None,
) -> Path:
    """Return a directory holding config.json, safetensors weights and a tokenizer.

    A Hugging Face source is fetched only if its files fit on the cache's disk and in
    ``device_free`` bytes (None: not checked), by the sizes the Hub's metadata gives. A local
    source is read at its real path, the one ``loadpolicy.check_source`` allowed. A download
    and a GGUF materialisation report their stage and progress to ``progress``.
    """
    if spec.hf_repo:
        return _resolve_hub(spec, cache_dir, device_free, progress)
    path = Path(spec.path).expanduser().resolve()
    if path.is_file() and path.suffix == ".gguf":
        return materialise_gguf(path, cache_dir, progress)
    if spec.gguf_file:
        gguf = path / spec.gguf_file
        if not gguf.is_file():
            raise LoadFailed(f"{gguf}: no such GGUF file")
        return materialise_gguf(gguf, cache_dir, progress)
    if not (path / "config.json").is_file():
        raise LoadFailed(f"{path}: not a model directory (no config.json)")
    return path


def _resolve_hub(
    spec: ModelSpec, cache_dir: Path, device_free: int | None, progress: LoadProgress | None
) -> Path:
    # Imported here so that the cache-only paths never pay for huggingface_hub's import.
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    hub_cache = cache_dir / "hub"
    revision = spec.revision or None
    where = f"hf:{spec.hf_repo}@{spec.revision or 'main'}"
    # Without the sizes from the Hub's metadata nothing is fetched: only the cache is used.
    unsized = ""
    download = 0
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
    if progress is not None and download:
        progress.begin(DOWNLOADING, BYTES, download)
    blobs = _blobs_dir(hub_cache, spec.hf_repo)
    try:
        with _counting_download(blobs, download, progress):
            if spec.gguf_file:
                gguf = hf_hub_download(
                    spec.hf_repo,
                    spec.gguf_file,
                    revision=revision,
                    cache_dir=hub_cache,
                    local_files_only=local_only,
                )
            else:
                snapshot = snapshot_download(
                    spec.hf_repo,
                    revision=revision,
                    cache_dir=hub_cache,
                    allow_patterns=HUB_PATTERNS,
                    local_files_only=local_only,
                )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise LoadFailed(f"{where}: {e}{unsized}") from e
    if spec.gguf_file:
        return materialise_gguf(Path(gguf), cache_dir, progress)
    path = Path(snapshot)
    if not (path / "config.json").is_file():
        raise LoadFailed(f"hf:{spec.hf_repo}: no config.json in the repository")
    return path


def _hub_sizes(info: Any, spec: ModelSpec, hub_cache: Path) -> tuple[int, int]:
    """Bytes of the repository's files a load uses, and of those not in the cache yet."""
    from huggingface_hub.utils import filter_repo_objects

    siblings = info.siblings or []
    if spec.gguf_file:
        files = [s for s in siblings if s.rfilename == spec.gguf_file]
    else:
        files = list(filter_repo_objects(siblings, allow_patterns=HUB_PATTERNS, key=_name))
    # The cache keeps each file once, named by its etag: the LFS sha256, else the git blob id.
    blobs = _blobs_dir(hub_cache, spec.hf_repo)
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


def _blobs_dir(hub_cache: Path, repo: str) -> Path:
    """Where the Hub cache keeps ``repo``'s files, each once, named by its etag."""
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache / repo_folder_name(repo_id=repo, repo_type="model") / "blobs"


@contextmanager
def _counting_download(blobs: Path, expected: int, progress: LoadProgress | None) -> Iterator[None]:
    """Count the bytes written into ``blobs`` while the body runs, up to the ``expected``
    bytes of the download (another load of the same repository may write there too): to
    ``progress`` and to the downloaded-bytes metric. huggingface_hub writes every download,
    over HTTP or Xet, into a ``.incomplete`` file there and renames it when done, so the
    folder's size is what arrived whatever the transfer's backend."""
    if progress is None or not expected:
        yield
        return
    # While files are written, only their written blocks count (see _folder_bytes); once the
    # download is over, every file is whole and their sizes count.
    start = {written: _folder_bytes(blobs, written) for written in (True, False)}
    counted = 0
    stop = threading.Event()

    def look(written: bool = True) -> None:
        nonlocal counted
        arrived = min(max(0, _folder_bytes(blobs, written) - start[written]), expected)
        if arrived > counted:
            metrics.DOWNLOADED_BYTES.inc(arrived - counted)
            counted = arrived
            progress.advance_to(arrived)

    def watch() -> None:
        while not stop.wait(DOWNLOAD_POLL):
            look()

    watcher = threading.Thread(target=watch, name="download-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        look(written=False)


def _folder_bytes(folder: Path, written: bool) -> int:
    """Bytes of the files in ``folder``: their sizes, or with ``written`` only the blocks
    written so far (a file written out of order may be sparse), never more than its size (a
    file system may allocate ahead of the writes)."""
    total = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:  # not made yet
        return 0
    for entry in entries:
        try:
            stat = entry.stat(follow_symlinks=False)
        except OSError:  # renamed or removed between the listing and the look
            continue
        total += min(stat.st_size, stat.st_blocks * 512) if written else stat.st_size
    return total


def materialise_gguf(gguf: Path, cache_dir: Path, progress: LoadProgress | None = None) -> Path:
    """Dequantise a GGUF file once into ``cache_dir/gguf/<digest>``; later calls reuse it.

    While it dequantises, ``progress`` counts the tensors converted of the file's."""
    digest = file_sha256(gguf)
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
        if progress is not None:
            progress.begin(MATERIALISING)
        try:
            _dequantise_into(gguf, scratch, progress)
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


def _dequantise_into(gguf: Path, out: Path, progress: LoadProgress | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _count_converted_tensors()
    token = _CONVERTING.set(progress)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    finally:
        _CONVERTING.reset(token)
    # Drop every trace of GGUF quantisation so the folder reloads as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # The projections that were 4-bit in the file, and the vocabulary projection where it was
    # 8-bit, keep their codes for the CPU's decode steps.
    save_int4(find_int4(model), out / INT4_FILE)
    head = codes8_of(model.lm_head.weight)
    save_int8({"lm_head": head} if head is not None else {}, out / INT8_FILE)


# The load whose GGUF tensors this thread converts (contexts are per thread and per task).
_CONVERTING: ContextVar[LoadProgress | None] = ContextVar("converting", default=None)
_hooked = threading.Lock()


def _count_converted_tensors() -> None:
    """Have transformers' GGUF conversion report each tensor it converts to the load in
    ``_CONVERTING``. transformers walks the file's tensors through its module's ``tqdm``, so
    that name is wrapped once; where a later transformers walks them otherwise, the stage is
    simply reported without a count."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    with _hooked:
        original = getattr(gguf_utils, "tqdm", None)
        if original is None or getattr(original, "counts_for_loads", False):
            return

        def counting(items: Any, *args: Any, **kwargs: Any) -> Any:
            progress = _CONVERTING.get()
            if progress is None:
                return original(items, *args, **kwargs)
            return progress.counted(items, TENSORS)

        counting.counts_for_loads = True  # type: ignore[attr-defined]
        gguf_utils.tqdm = counting


def _materialised(target: Path) -> bool:
    """Whether ``target`` holds a complete materialisation in the current layout."""
    try:
        marker = json.loads((target / ".complete").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == MATERIALISED_FORMAT


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes (what the Hub's LFS names a file by)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def parameter_bytes(model_dir: Path, dtype_bytes: int | None) -> int:
    """Bytes the weights take once loaded: read from the safetensors headers, not the data.

    ``dtype_bytes`` is the size of one element in the dtype the model will be loaded in, or
    None to keep each tensor's stored dtype. 4-bit and 8-bit codes count as stored.
    """
    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        element = None if file.name in (INT4_FILE, INT8_FILE) else dtype_bytes
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
