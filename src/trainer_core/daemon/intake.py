"""Taking files in: from the inbox once they are complete, or from ``trainer daemon submit``.

A file in the inbox is complete when it was written under a temporary name and renamed (names
starting with ``.`` or ending in ``.tmp``/``.part``... are never looked at), or when its size
and modification time have not changed for ``daemon.settle_s`` seconds: a writer that appends
in place keeps moving the modification time, so it is not taken half-written.

Taking a file is two steps, each finished by a restart if a kill interrupts it: the ledger row
is inserted as ``incoming``, the file is moved (inbox) or copied (submit) to
``queue/<id>-<name>``, then the row becomes ``queued`` -- or ``skipped`` when the same content
(sha256) is already queued, training or completed and the file was not forced.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from trainer_core.daemon.home import PRIORITY_LEVELS, TEMP_SUFFIXES, Home
from trainer_core.daemon.ledger import Ledger
from trainer_core.data.kinds import is_data_file
from trainer_core.errors import UserError
from trainer_core.files import sha256_file


def is_candidate(path: Path) -> bool:
    """A data file of a kind training reads (``data.kinds.DATA_SUFFIXES``), not a temporary."""
    name = path.name
    return (is_data_file(path) and not name.startswith(".")
            and not name.endswith(TEMP_SUFFIXES))


def inbox_priority(home: Home, path: Path, default: str) -> int:
    """inbox/high/... and inbox/low/... set the priority; anything else gets ``default``."""
    first = path.relative_to(home.inbox).parts[0]
    return PRIORITY_LEVELS.get(first if first in ("high", "low") else default, 1)


class InboxWatcher:
    """Finds complete files in the inbox: a file is ready when its modification time is at
    least ``settle_s`` old *and* its size and modification time did not change since the
    previous scan (so a writer that keeps a file's mtime still is caught by its size)."""

    def __init__(self, home: Home, settle_s: float):
        self.home = home
        self.settle_s = settle_s
        self.seen: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) at last scan

    def ready(self, now: float | None = None) -> list[Path]:
        """Complete candidate files, in name order (deterministic intake order)."""
        now = time.time() if now is None else now
        out: list[Path] = []
        current: dict[Path, tuple[int, int]] = {}
        for path in sorted(self.home.inbox.rglob("*")):
            rel_parts = path.relative_to(self.home.inbox).parts
            if any(p.startswith(".") for p in rel_parts) or not is_candidate(path):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if not path.is_file():
                continue
            sig = (st.st_size, st.st_mtime_ns)
            current[path] = sig
            if self.seen.get(path) == sig and now - st.st_mtime >= self.settle_s:
                out.append(path)
        self.seen = current
        return out

    def forget(self, path: Path) -> None:
        self.seen.pop(path, None)


def take_from_inbox(home: Home, ledger: Ledger, path: Path, default_priority: str
                    ) -> dict[str, Any]:
    """Register an inbox file and move it into the queue; returns its (final) ledger row."""
    sha = sha256_file(path)
    rel = path.relative_to(home.inbox).as_posix()
    row = ledger.add_file(rel, str(path), "inbox", sha, path.stat().st_size,
                          inbox_priority(home, path, default_priority))
    return finish_incoming(home, ledger, row)


def submit(home: Home, ledger: Ledger, path: Path, priority: str, force: bool = False
           ) -> dict[str, Any]:
    """Copy ``path`` into the queue atomically and register it (``trainer daemon submit``).

    A duplicate (same sha256 as a queued, training or completed file) is not queued unless
    ``force``; its row comes back with state ``skipped`` and ``duplicate_of`` set.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if priority not in PRIORITY_LEVELS:
        raise UserError(f"--priority: must be one of high, normal, low, got {priority!r}")
    sha = sha256_file(path)
    row = ledger.add_file(path.name, str(path.absolute()), "submit", sha, path.stat().st_size,
                          PRIORITY_LEVELS[priority], forced=force)
    return finish_incoming(home, ledger, row)


def finish_incoming(home: Home, ledger: Ledger, row: dict[str, Any]) -> dict[str, Any]:
    """Put an ``incoming`` file in place and decide queued or skipped (idempotent)."""
    dup = None if row["forced"] else ledger.find_duplicate(row["sha256"])
    if dup is not None and dup["id"] == row["id"]:
        dup = None
    target_state = "queued" if dup is None else "skipped"
    dest = home.folder(target_state) / row["fname"]
    source = Path(row["source"])
    if not dest.exists():
        if row["origin"] == "inbox":
            if source.exists():
                os.replace(source, dest)
        elif source.exists():
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(source, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
    if not dest.exists():
        ledger.set_file(row["id"], state="failed", error="file vanished before it was taken in",
                        finished_at=time.time())
        return ledger.file(row["id"])
    if dup is None:
        ledger.set_file(row["id"], state="queued")
    else:
        from trainer_core.daemon.reports import write_report

        ledger.set_file(row["id"], state="skipped", duplicate_of=dup["id"],
                        error=f"duplicate of #{dup['id']} {dup['name']} ({dup['state']}); "
                              "not trained again (submit with --force to train it anyway)",
                        finished_at=time.time())
        write_report(home, ledger, row["id"])
    return ledger.file(row["id"])
