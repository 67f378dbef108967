"""``status.json``: the run's current state, rewritten atomically at most every N seconds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from trainer_core.files import write_json_atomic


class StatusWriter:
    """Keeps ``status.json`` current, writing at most every ``interval`` seconds."""

    def __init__(self, path: Path, interval: float, base: dict[str, Any]):
        self.path = path
        self.interval = interval
        self.data: dict[str, Any] = dict(base)
        self._last = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
        self.data.update(fields)
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self.data["updated_at"] = time.time()
            write_json_atomic(self.path, self.data)
            self._last = now
