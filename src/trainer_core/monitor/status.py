"""``status.json``: the run's current state, rewritten atomically at most every N seconds.

Readers (``trainer watch``, the dashboard, a daemon) use :func:`read_status`, which also says
what the writer cannot: that a run marked running has stopped moving (``stalled``) or that its
process is gone (``dead``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from trainer_core.files import STATUS_FILE, write_json_atomic


class StatusWriter:
    """Keeps ``status.json`` current, writing at most every ``interval`` seconds.

    Thread-safe: the stall watchdog may update it while the training thread does.
    """

    def __init__(self, path: Path, interval: float, base: dict[str, Any]):
        self.path = path
        self.interval = interval
        self.data: dict[str, Any] = dict(base)
        self._last = 0.0
        self._lock = threading.Lock()

    def update(self, force: bool = False, **fields: Any) -> None:
        with self._lock:
            self.data.update(fields)
            now = time.monotonic()
            if force or now - self._last >= self.interval:
                self.data["updated_at"] = time.time()
                write_json_atomic(self.path, self.data)
                self._last = now


def pid_alive(pid: Any) -> bool | None:
    """Whether process ``pid`` exists on this machine (None: cannot tell)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


def read_status(run_dir: Path, now: float | None = None) -> dict[str, Any] | None:
    """``status.json`` of ``run_dir`` (None if absent or unreadable) with reader-side facts.

    For a run marked running it adds ``stalled`` (seconds since its last event exceed its
    ``stall_after_s``, with an active ``stalled`` alert added if the writer could not add one)
    and ``process_alive`` (False when its pid no longer exists: killed or crashed).
    """
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict):
        return None
    if status.get("state") != "running":
        return status
    now = time.time() if now is None else now
    last = status.get("last_event_at") or status.get("updated_at") or status.get("started_at")
    limit = status.get("stall_after_s")
    alerts = list(status.get("alerts") or [])
    if isinstance(last, (int, float)) and isinstance(limit, (int, float)):
        idle = now - last
        status["stalled"] = idle > limit
        if status["stalled"] and not any(a.get("alert") == "stalled" for a in alerts):
            alerts.append({"alert": "stalled", "state": "raised", "level": "error",
                           "step": status.get("step"), "time": now,
                           "message": f"no update for {idle:.0f} s (limit {limit:g} s): the "
                                      "run may be hung or its process gone"})
    same_host = status.get("host") in (None, socket.gethostname())
    alive = pid_alive(status.get("pid")) if same_host else None
    if alive is not None:
        status["process_alive"] = alive
    status["alerts"] = alerts
    return status
