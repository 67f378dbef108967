"""SIGINT/SIGTERM: a flag the loop checks after each step, or an immediate stop.

Outside the training loop (data loading, preprocessing, model loading) and on a second signal
inside it, a signal raises :class:`RunInterrupted` at once; the recipe turns that into state
``interrupted`` and exit 1. Inside the loop (``deferred``) the first signal only sets a flag, so
the current step finishes and a checkpoint is saved.
"""

from __future__ import annotations

import signal
import time
from typing import Any


class RunInterrupted(BaseException):
    """A signal stopped the run where no checkpoint could be taken (a BaseException, so that
    ``except Exception`` in library or plugin code cannot swallow it)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag (when ``deferred``) or :class:`RunInterrupted`.

    ``repeat_window_s``: a signal this soon after the first is the same request delivered
    twice, not a second Ctrl-C (the recipe uses 1 s under several processes, 0 otherwise).
    """

    def __init__(self, deferred: bool = True, repeat_window_s: float = 0.0) -> None:
        self.signal: int | None = None
        self.deferred = deferred
        self.repeat_window_s = repeat_window_s
        self._at = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. embedded): no handlers
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.deferred and self.signal is not None and (
                time.monotonic() - self._at <= self.repeat_window_s):
            # The same request delivered twice (under torchrun, Ctrl-C reaches the workers
            # directly and again forwarded by torchrun): not a second Ctrl-C.
            return
        if not self.deferred or self.signal is not None:  # second signal: stop now
            self.signal = signum
            raise RunInterrupted(signum)
        self.signal, self._at = signum, time.monotonic()

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
