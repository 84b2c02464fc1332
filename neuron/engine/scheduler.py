"""The scheduler: which sequences wait, which run, and what the next step does with them.

It decides and never runs: ``schedule()`` says which sequences leave (cancelled or aborted)
and which waiting ones join the batch, and ``due()`` says when the next step has work. Its
lock guards what the asyncio side and the device thread share (the waiting queue and the
count of unfinished sequences); the running list is the device thread's alone.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from neuron import metrics
from neuron.engine.sequence import Sequence
from neuron.errors import QueueFull

# How many batch windows at most an idle model waits for a burst to finish arriving.
WINDOW_CAP = 5


@dataclass
class Schedule:
    """One step's decisions: who is dropped, which running rows leave, who joins."""

    dropped: list[Sequence] = field(default_factory=list)  # were waiting, now cancelled
    leaving: list[int] = field(default_factory=list)  # rows of ``running`` to drop
    joining: list[Sequence] = field(default_factory=list)  # to prefill and add to the batch


class Scheduler:
    """Waiting and running sequences of one model, within its bounds and batch window."""

    def __init__(
        self, model_id: str, max_batch_size: int, max_waiting: int, batch_window: float
    ) -> None:
        self.model_id = model_id
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        # Seconds an idle model waits for another request before it runs the prompts it has,
        # so that requests arriving together are prefilled together (see ``due``).
        self.batch_window = batch_window
        self._lock = threading.Lock()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.unfinished = 0
        self._idle = threading.Event()
        self._idle.set()
        # The device thread's: the rows of the running batch, in order.
        self.running: list[Sequence] = []
        self._labels = {"model": model_id}

    # ---- from the asyncio side ----

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``, or raise ``QueueFull`` past the bound."""
        with self._lock:
            # Free batch slots count too: a burst must not be refused before the worker has
            # had a step to admit what it has room for.
            free = max(0, self.max_batch_size - len(self.running))
            if len(self.waiting) >= self.max_waiting + free:
                raise QueueFull(
                    f"model {self.model_id} has {len(self.waiting)} requests waiting for "
                    f"{free} free batch slots (the bound: max_waiting = {self.max_waiting})"
                )
            self.waiting.append(seq)
            self.unfinished += 1
            self._idle.clear()
            metrics.WAITING.labels(**self._labels).set(len(self.waiting))

    def withdraw(self, seq: Sequence) -> bool:
        """Take ``seq`` out of the waiting queue if it is still there (not admitted)."""
        with self._lock:
            if seq not in self.waiting:
                return False
            self.waiting.remove(seq)
            seq.cancelled = True  # nothing more goes to its sink
            metrics.WAITING.labels(**self._labels).set(len(self.waiting))
        return True

    def abort_all(self) -> None:
        """Mark every unfinished sequence to end with finish reason ``cancelled``."""
        with self._lock:
            for seq in list(self.waiting) + list(self.running):
                seq.aborted = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is waiting or running (call from a thread, not the loop)."""
        return self._idle.wait(timeout)

    # ---- from the device thread ----

    def due(self) -> float:
        """When the next step has work (``time.monotonic``): now while a batch runs, never
        when nothing waits. With no batch running, requests that arrive together are
        prefilled together: the prompts run once none has arrived for ``batch_window``, or
        ``WINDOW_CAP`` windows after the first (at once when they fill the batch). Without
        it a burst runs as the first prompt alone and then the rest, which wait for it."""
        if self.running:
            return 0.0
        with self._lock:
            if not self.waiting:
                return math.inf
            if len(self.waiting) >= self.max_batch_size:
                return 0.0
            window = self.batch_window
            return min(
                self.waiting[-1].arrived_at + window,
                self.waiting[0].arrived_at + WINDOW_CAP * window,
            )

    def schedule(self, admits: Callable[[Sequence], bool]) -> Schedule:
        """Drop what is cancelled, then take waiting sequences, in order, into the free batch
        slots while ``admits`` them (the KV cache has room)."""
        plan = Schedule(leaving=[i for i, s in enumerate(self.running) if s.leaving])
        room = self.max_batch_size - (len(self.running) - len(plan.leaving))
        with self._lock:
            plan.dropped = [s for s in self.waiting if s.leaving]
            for seq in plan.dropped:
                self.waiting.remove(seq)
            while room > 0 and self.waiting and admits(self.waiting[0]):
                plan.joining.append(self.waiting.popleft())
                room -= 1
        now = time.monotonic()
        for seq in plan.joining:
            if not seq.generated:  # a preempted one was counted when it first joined
                metrics.QUEUE_TIME.labels(**self._labels).observe(now - seq.arrived_at)
        return plan

    def requeue(self, seq: Sequence) -> None:
        """``seq``, taken out of the running batch, goes back to wait first in line."""
        with self._lock:
            self.waiting.appendleft(seq)

    def keep(self, rows: list[int]) -> None:
        """Only ``rows`` of the running batch stay, in that order."""
        self.running = [self.running[i] for i in rows]

    def finished(self) -> None:
        """One sequence has ended (counted for ``wait_idle``)."""
        with self._lock:
            self.unfinished -= 1
            if self.unfinished == 0:
                self._idle.set()

    def update_gauges(self) -> None:
        metrics.RUNNING.labels(**self._labels).set(len(self.running))
        metrics.WAITING.labels(**self._labels).set(len(self.waiting))
