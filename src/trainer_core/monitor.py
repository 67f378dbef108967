"""What a run tells the outside world while it trains: status.json, metrics.jsonl, the console.

``status.json`` is rewritten atomically (temp file + rename) so a dashboard or the future
daemon never reads half a file.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


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


class Progress:
    """A one-line progress bar on a TTY; plain log lines otherwise; nothing when quiet."""

    def __init__(self, total: int, quiet: bool, stream: Any = None):
        self.total = total
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._open = False

    def show(self, step: int, loss: float, lr: float, tok_s: float, eta: float) -> None:
        if self.quiet:
            return
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        line = (f"[{bar}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{tok_s:,.0f} tok/s ETA {format_duration(eta)}")
        if self.tty:
            self.stream.write("\r" + line)
            self._open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        """A message that must not be overwritten by the bar."""
        if self.quiet:
            return
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open and not self.quiet:
            self.stream.write("\n")
            self._open = False
