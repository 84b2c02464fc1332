"""Logging for both daemons: one line per event, to stderr (journald adds the time there).

Values logged may come from clients (model names, paths, request fields): every string
argument of a log call is cut at ``LOGGED`` characters and its control characters escaped, so
no client can start a line of its own in the journal or flood it.
"""

from __future__ import annotations

import logging
import sys

LOGGED = 200
# Control characters (a newline above all) as the escapes Python writes for them.
_ESCAPES = {c: ascii(chr(c))[1:-1] for c in [*range(32), 127]}


def clean(text: str, limit: int = LOGGED) -> str:
    """``text`` cut at ``limit`` characters, its control characters escaped."""
    if len(text) > limit:
        text = f"{text[:limit]}...({len(text) - limit} more)"
    return text.translate(_ESCAPES)


class _OneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(clean(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str) and not record.args:
            record.msg = clean(record.msg, 4 * LOGGED)
        return True


def configure(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_OneLine())
    # Library chatter (download progress, weight loading) is not ours to log at INFO.
    for noisy in ("httpx", "huggingface_hub", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
