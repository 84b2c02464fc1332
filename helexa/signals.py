"""SIGTERM and SIGINT for both daemons: the first starts a graceful stop, a second exits at once."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal

log = logging.getLogger(__name__)


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` writes every thread's stack to stderr (the journal): for hangs."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def stop_event_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event set by the first SIGTERM/SIGINT; the second one exits the process (code 1)."""
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("second signal, exiting at once signal=%s", name)
            os._exit(1)
        log.info("signal received, shutting down signal=%s", name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return stop
