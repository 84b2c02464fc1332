"""The device thread: one per device, it owns torch there and runs every model placed on it.

Nothing torch runs on the asyncio loop. The thread sleeps until an engine is due (see
``Scheduler.due``) or a call is queued (``call``: loads' and unloads' torch work, run between
steps so it never races a forward pass), then steps every engine that is due.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from neuron.engine.model_engine import ModelEngine


class DeviceWorker:
    """The thread that owns torch for one device and runs every model placed on it."""

    def __init__(self, device: torch.device, cpu_threads: int = 0) -> None:
        self.device = device
        # Guards the engine list and the call queue; wakes the thread (``wake``).
        self._cond = threading.Condition()
        self._engines: list[ModelEngine] = []
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._stopped = False
        self._cpu_threads = cpu_threads
        self._thread = threading.Thread(target=self._run, name=f"torch-{device}", daemon=True)
        self._thread.start()

    def attach(self, engine: ModelEngine) -> None:
        with self._cond:
            engine.attached(self)
            self._engines.append(engine)
            self._cond.notify()

    def detach(self, engine: ModelEngine) -> None:
        with self._cond:
            if engine in self._engines:
                self._engines.remove(engine)
            engine.attached(None)

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on this device's thread between steps (torch work that must not race)."""
        future: Future[Any] = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def wake(self) -> None:
        """Have the thread look again at what is due (new work, a cancellation)."""
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)

    @contextlib.contextmanager
    def threads(self) -> Iterator[None]:
        """torch's threads for one forward pass, and one between passes.

        Between passes this thread samples, detokenises and hands chunks to the event loop,
        which needs a core at that moment too: with torch left at every core, one stream
        ran at 31 tokens/s and 8 at 137-145 on 2 cores; dropping to one thread between
        passes gave 49-53 and 208-212 (the bare step is 48 and 237).
        """
        if self.device.type != "cpu":
            yield
            return
        torch.set_num_threads(self._cpu_threads or len(os.sched_getaffinity(0)))
        try:
            yield
        finally:
            torch.set_num_threads(1)

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    now = time.monotonic()
                    dues = [(e, e.due()) for e in self._engines]
                    due = min((d for _, d in dues), default=math.inf)
                    if self._calls or due <= now:
                        break
                    self._cond.wait(None if due == math.inf else due - now)
                calls = list(self._calls)
                self._calls.clear()
                engines = [e for e, d in dues if d <= now]
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:
                        future.set_exception(e)
            for engine in engines:
                engine.step()
