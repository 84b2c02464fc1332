"""What a load may make this neuron read or fetch, decided before it reads or fetches anything.

A local source must lie, by its real path (symlinks and ``..`` resolved), under ``cache_dir``
or a directory in ``loading.local_dirs``; a refused path gets the same answer whether it exists
or not, naming only the path asked for (escaped and cut short). A Hugging Face repository must
be on ``loading.hf_repos`` when that list is set. A download must fit on the cache's disk, and
the weights in the memory of the device with the most free, by the sizes the Hub's metadata
gives, before any file is fetched.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from neuron.errors import NoRoom, NotAllowed

if TYPE_CHECKING:  # sources imports this module
    from helexa.modelspec import ModelSpec

# Characters of a refused path or repository a refusal shows.
SHOWN = 120


def check_source(
    spec: ModelSpec, local_dirs: Sequence[str], hf_repos: Sequence[str], key: str
) -> None:
    """Raise ``NotAllowed`` naming ``key``'s field and the config key if ``spec`` may not load.

    ``local_dirs`` includes ``cache_dir``. Reads the file system (real paths): call it off the
    event loop.
    """
    if spec.hf_repo:
        if hf_repos and not any(_repo_matches(spec.hf_repo, p) for p in hf_repos):
            raise NotAllowed(f"{key}.hf_repo {shown(spec.hf_repo)}: not in loading.hf_repos")
        return
    targets = [Path(spec.path).expanduser()]
    if spec.gguf_file:
        targets.append(targets[0] / spec.gguf_file)
    roots = [root for root in map(_real, local_dirs) if root is not None]
    for target in targets:
        real = _real(str(target))
        if real is None or not any(real == root or real.is_relative_to(root) for root in roots):
            # One answer whether it exists or not, a file or a directory, readable or not.
            raise NotAllowed(
                f"{key}.path {shown(str(target))}: not under cache_dir or a directory in "
                "loading.local_dirs"
            )


def check_download_fits(
    what: str, download: int, weights: int, dtype: str, disk_free: int, device_free: int | None
) -> None:
    """Raise ``NoRoom`` unless ``download`` bytes fit in ``disk_free`` and ``weights`` bytes of
    files could fit in ``device_free`` (None: not checked).

    The device check is a lower bound, so it never refuses a model that would fit: weights
    stored in 32 bits take half their size loaded in 16 (``dtype`` other than float32). The
    exact check, from the safetensors headers, runs when the files are here.
    """
    if download > disk_free:
        raise NoRoom(
            f"{what} does not fit: its files to download take {download} bytes and the cache's "
            f"disk has {disk_free} bytes free"
        )
    least = weights if dtype == "float32" else weights // 2
    if device_free is not None and least > device_free:
        raise NoRoom(
            f"{what} does not fit: its {weights} bytes of files take at least {least} bytes "
            f"loaded and the device with the most room has {device_free} bytes free"
        )


def free_disk(path: Path) -> int:
    """Bytes free on the file system ``path`` is (or will be) on."""
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return shutil.disk_usage(".").free


def shown(text: str) -> str:
    """``text`` as a refusal may show it: escaped, and cut at ``SHOWN`` characters."""
    return ascii(text if len(text) <= SHOWN else text[:SHOWN] + "...")


def _repo_matches(repo: str, pattern: str) -> bool:
    if pattern.endswith("/*"):
        return repo.startswith(pattern[:-1]) and "/" not in repo[len(pattern) - 1 :]
    return repo == pattern


def _real(path: str) -> Path | None:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return None
