"""The console progress bar (a TTY) or log lines (a pipe or file)."""

from __future__ import annotations

import math
import sys
from typing import Any


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


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
