"""Logging for both daemons: one line per event, to stderr (journald adds the time there)."""

from __future__ import annotations

import logging
import sys


def configure(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # Library chatter (download progress, weight loading) is not ours to log at INFO.
    for noisy in ("httpx", "huggingface_hub", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
