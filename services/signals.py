"""SIGINT/SIGTERM handling for asyncio: the first signal asks for a graceful stop, a second one
exits at once.

``capture_signals(stop)`` installs loop handlers that record the signal and set the ``stop`` event;
the running job drains and reports how to resume. On a second signal the process leaves
immediately with the signal's exit status (128 + number), after flushing stdio. On exit the
previous handlers are restored, so tests and embedding code see the process as they left it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

log = structlog.get_logger(__name__)


@dataclass
class StopRequest:
    """Set by the first signal; ``signal`` says which one arrived."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    signal: signal.Signals | None = None

    @property
    def exit_status(self) -> int | None:
        """128 + signal number, as a shell reports a process ended by that signal."""
        return None if self.signal is None else 128 + int(self.signal)


@contextmanager
def capture_signals(stop: StopRequest) -> Iterator[StopRequest]:
    """Route SIGINT/SIGTERM to ``stop`` for the duration of the block."""
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}

    def on_signal(sig: signal.Signals) -> None:
        if stop.signal is not None:
            log.warning("second signal, exiting now", signal=sig.name)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + int(sig))
        stop.signal = sig
        stop.event.set()

    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)
