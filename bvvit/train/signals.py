"""SIGINT/SIGTERM during training: stop gracefully, but always within seconds.

The first signal asks training to stop at the next safe point (after the current step, or
between validation batches); the runner then saves a resumable checkpoint and exits with
128 + signum. A step or a data read can block for good (a hung network file system, a
FIFO named like an image), so the first signal also starts a watchdog: if the process is
still running GRACE_S seconds later, it prints one line and exits with the same code. The
blocked step is not saved; the last checkpoint on disk stays. A checkpoint write that is
under way when the time runs out is allowed to finish first (:meth:`StopRequest.writing`),
so the watchdog never leaves a half-rotated checkpoint. A second signal aborts at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)

GRACE_S = 10.0  # seconds a stop request may take before the process exits without saving


class StopRequested(Exception):
    """Raised at a safe point that cannot simply return (between validation batches)."""


class StopRequest:
    """Callable flag set by SIGINT/SIGTERM: ``stop()`` is True once a signal arrived."""

    def __init__(self, grace_s: Optional[float] = None) -> None:
        self.signum: Optional[int] = None
        self.grace_s = GRACE_S if grace_s is None else grace_s
        self._previous: dict[int, Any] = {}
        self._write_lock = threading.Lock()
        self._watchdog: Optional[threading.Timer] = None

    def __call__(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass
        return self

    def restore(self) -> None:
        """Put the previous handlers back and stop the watchdog (the run has ended)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._watchdog is not None:
            self._watchdog.cancel()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the watchdog off while a checkpoint is written."""
        with self._write_lock:
            yield

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        log.info(f"\n{signal.Signals(signum).name} received: finishing this step, then saving "
                 f"a resumable checkpoint (send again to abort without saving; after "
                 f"{self.grace_s:g} s it exits without saving)")
        self._watchdog = threading.Timer(self.grace_s, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        self._write_lock.acquire()  # let a checkpoint write finish; never release: we exit
        assert self.signum is not None
        # Straight to stderr, not through logging: the blocked main thread may hold a
        # logging lock (a write to a full pipe), and this line must come out anyway.
        print(f"run.py: {signal.Signals(self.signum).name} received {self.grace_s:g} s ago and "
              "training has not reached a safe point (a step or a data read is blocked); "
              "exiting without saving, the last checkpoint on disk is intact",
              file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():  # DataLoader workers, maybe blocked too
            child.kill()
        os._exit(128 + self.signum)


__all__ = ["GRACE_S", "StopRequest", "StopRequested"]
