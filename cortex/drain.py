"""How fast each model's queue drains, and so how long a refused client should wait.

cortex counts the generations it relays to their end, per model. The drain rate is those
completions over the last ``WINDOW`` seconds (or since cortex started, if less) divided by
that time. Until the window holds ``MIN_COMPLETIONS`` (or cortex has run for a whole
window) the rate is not known: one early answer over cortex's first second is no measure of
a neuron that serves dozens at once, and must not refuse the burst behind it. A client
refused for want of room is told to come back when the requests queued ahead of it, plus
its own, should have drained: ``Retry-After = ceil((queued + 1) / rate)``,
clamped to ``1..most``. With no rate known, the configured fallback is given instead.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

WINDOW = 60.0
MIN_COMPLETIONS = 8


class DrainRate:
    """Completions per second of each model, over a sliding window."""

    def __init__(self, window: float = WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self.started = clock()
        self._done: dict[str, deque[float]] = {}

    def finished(self, model_id: str) -> None:
        """One generation of ``model_id`` ran to its end."""
        now = self.clock()
        done = self._done.setdefault(model_id, deque())
        done.append(now)
        self._trim(done, now)

    def rate(self, model_id: str) -> float:
        """Completions per second over the window; 0 (not known) when it holds fewer than
        ``MIN_COMPLETIONS`` and cortex has not yet run for a whole window."""
        now = self.clock()
        done = self._done.get(model_id)
        if not done:
            return 0.0
        self._trim(done, now)
        up = now - self.started
        if len(done) < MIN_COMPLETIONS and up < self.window:
            return 0.0
        span = max(1.0, min(self.window, up))
        return len(done) / span

    def retry_after(self, model_id: str, queued: int, fallback: int, most: int) -> int:
        """Seconds until ``queued`` requests and one more should have drained, in 1..most."""
        rate = self.rate(model_id)
        seconds = math.ceil((queued + 1) / rate) if rate > 0 else fallback
        return max(1, min(most, seconds))

    def _trim(self, done: deque[float], now: float) -> None:
        while done and done[0] < now - self.window:
            done.popleft()
