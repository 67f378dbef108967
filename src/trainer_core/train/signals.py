"""SIGINT/SIGTERM: a flag the loop checks after each step, or an immediate stop.

Outside the training loop (data loading, preprocessing, model loading) and on a second signal
inside it, a signal raises :class:`RunInterrupted` at once; the recipe turns that into state
``interrupted`` and exit 1. Inside the loop (``deferred``) the first signal only sets a flag, so
the current step finishes and a checkpoint is saved.
"""

from __future__ import annotations

import signal
from typing import Any


class RunInterrupted(BaseException):
    """A signal stopped the run where no checkpoint could be taken (a BaseException, so that
    ``except Exception`` in library or plugin code cannot swallow it)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag (when ``deferred``) or :class:`RunInterrupted`."""

    def __init__(self, deferred: bool = True) -> None:
        self.signal: int | None = None
        self.deferred = deferred
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. embedded): no handlers
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self.deferred or self.signal is not None:  # second signal: stop now
            self.signal = signum
            raise RunInterrupted(signum)
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
