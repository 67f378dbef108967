"""SIGINT/SIGTERM become a flag the loop checks after each step."""

from __future__ import annotations

import signal
import time
from typing import Any


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signal: int | None = None
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
        # A second signal stops now; one within a second of the first is the same request
        # delivered twice (Ctrl-C reaches torchrun's workers directly and forwarded by it).
        if self.signal is not None:
            if time.monotonic() - self._at > 1.0:
                raise KeyboardInterrupt
            return
        self.signal, self._at = signum, time.monotonic()

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
