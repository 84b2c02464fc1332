"""Where a model's load stands: its stage and how far it is, for ListModels and the log.

A load passes through stages (downloading, materialising, loading weights, warming up). Each
stage is logged once as it begins; its progress (bytes or tensors done of a total, where that
can be measured) at most once every ``LOG_EVERY`` seconds. The load's threads update it and
the event loop reads it: ``snapshot()`` takes the stage and its figures under one lock, so a
reader never sees one stage's count with another's total.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

DOWNLOADING, MATERIALISING, LOADING_WEIGHTS, WARMING_UP = (
    "downloading",
    "materialising",
    "loading weights",
    "warming up",
)
BYTES, TENSORS = "bytes", "tensors"
# Seconds between two progress lines of one stage in the log.
LOG_EVERY = 5.0

T = TypeVar("T")


@dataclass(frozen=True)
class Snapshot:
    """A load's stage ("" before the first), the unit of its progress ("" when not measured),
    and how much of ``total`` (0: not known) is done."""

    stage: str = ""
    unit: str = ""
    done: int = 0
    total: int = 0

    @property
    def percent(self) -> float | None:
        return 100.0 * self.done / self.total if self.total else None


class LoadProgress:
    """The progress of one model's load, reported by the code that does it."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._lock = threading.Lock()
        self._now = Snapshot()
        self._logged_at = 0.0

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._now

    def begin(self, stage: str, unit: str = "", total: int = 0) -> None:
        """Enter ``stage``, whose progress is counted in ``unit`` up to ``total`` (0: unknown)."""
        with self._lock:
            self._now = Snapshot(stage, unit, 0, total)
            self._logged_at = time.monotonic()
        log.info(
            "model load stage model=%s stage=%s total=%d unit=%s",
            self.model_id, stage.replace(" ", "_"), total, unit or "-",
        )  # fmt: skip

    def advance_to(self, done: int) -> None:
        """``done`` units of the current stage are done (never more than its total)."""
        now = time.monotonic()
        with self._lock:
            total = self._now.total
            self._now = Snapshot(self._now.stage, self._now.unit, min(done, total or done), total)
            current = self._now
            due = now - self._logged_at >= LOG_EVERY
            if due:
                self._logged_at = now
        if due:
            percent = current.percent
            log.info(
                "model load progress model=%s stage=%s done=%d total=%d unit=%s percent=%s",
                self.model_id, current.stage.replace(" ", "_"), current.done, current.total,
                current.unit, "-" if percent is None else f"{percent:.1f}",
            )  # fmt: skip

    def counted(self, items: Iterable[T], unit: str) -> Iterator[T]:
        """Yield ``items``, counting one ``unit`` done as the next is asked for (or the end)."""
        listed = list(items)
        with self._lock:
            self._now = Snapshot(self._now.stage, unit, 0, len(listed))
        for i, item in enumerate(listed):
            yield item
            self.advance_to(i + 1)
