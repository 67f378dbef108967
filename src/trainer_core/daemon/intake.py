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

import contextlib
import errno
import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from trainer_core.daemon.home import PRIORITY_LEVELS, TEMP_SUFFIXES, Home
from trainer_core.daemon.ledger import Ledger
from trainer_core.data.kinds import is_data_file
from trainer_core.errors import UserError


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


#: Prefix of the copy an inbox symlink's content is taken into (``queue/.link-*.tmp``).
LINK_COPY_PREFIX = ".link-"
#: File kinds whose rows are not lines (no row-size check by lines).
NOT_LINE_BASED = (".parquet", ".arrow", ".feather")
DEFAULT_MAX_ROW_BYTES = 16 << 20


def utf8_name(path: Path, root: Path) -> Path | None:
    """An inbox file whose name is not valid UTF-8 (``bad\\xff.jsonl``, legal on Linux) is
    renamed in place to the same name with U+FFFD for the bad bytes, so that the ledger,
    logs and reports can hold it; returns the new path (taken at a later scan), or None
    when the name was fine."""
    try:
        str(path).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    fixed = os.fsencode(path.name).decode("utf-8", "replace")
    try:
        str(path.parent).encode("utf-8")
        parent = path.parent
    except UnicodeEncodeError:  # a folder with a bad name: to the top of the inbox
        parent = root
    new = parent / fixed
    n = 1
    while new.exists():
        new = parent / f"{Path(fixed).stem}-{n}{Path(fixed).suffix}"
        n += 1
    os.replace(path, new)
    return new


def digest_and_check(path: Path, max_row_bytes: int | None) -> tuple[str, str | None]:
    """sha256 of a file and, for line-based files, the first row longer than
    ``max_row_bytes`` (``None`` when all fit), in one pass over the file."""
    digest = hashlib.sha256()
    check = max_row_bytes is not None and path.suffix.lower() not in NOT_LINE_BASED
    line, length, problem = 1, 0, None
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            if not check or problem is not None:
                continue
            start = 0
            while problem is None:
                nl = block.find(b"\n", start)
                length += (len(block) if nl < 0 else nl) - start
                if length > max_row_bytes:  # type: ignore[operator]
                    problem = (f"line {line}: a row of more than {max_row_bytes / (1 << 20):g} "
                               "MiB (daemon.max_row_mb); the file was not taken for training")
                if nl < 0:
                    break
                line, length, start = line + 1, 0, nl + 1
    return digest.hexdigest(), problem


def take_from_inbox(home: Home, ledger: Ledger, path: Path, default_priority: str,
                    max_row_bytes: int | None = DEFAULT_MAX_ROW_BYTES) -> dict[str, Any] | None:
    """Register an inbox file and move it into the queue; returns its (final) ledger row, or
    None when it was renamed first (a name that is not UTF-8: taken at the next scan).

    A symlink is not trusted to stay: its content is copied into the queue (then hashed, so
    the hash is of what will be trained) and the link removed; completed/ keeps the content.
    """
    if utf8_name(path, home.inbox) is not None:
        return None
    rel = path.relative_to(home.inbox).as_posix()
    priority = inbox_priority(home, path, default_priority)
    source = path
    if path.is_symlink():
        source = home.queue / f"{LINK_COPY_PREFIX}{uuid.uuid4().hex}.tmp"
        try:
            shutil.copyfile(path, source)
            with open(source, "rb") as fh:
                os.fsync(fh.fileno())
        except BaseException:
            source.unlink(missing_ok=True)
            raise
        path.unlink()
    sha, problem = digest_and_check(source, max_row_bytes)
    row = ledger.add_file(rel, str(source), "inbox", sha, source.stat().st_size, priority)
    return finish_incoming(home, ledger, row, refuse=problem)


def submit(home: Home, ledger: Ledger, path: Path, priority: str, force: bool = False,
           max_row_bytes: int | None = DEFAULT_MAX_ROW_BYTES) -> dict[str, Any]:
    """Copy ``path`` into the queue atomically and register it (``trainer daemon submit``).

    A duplicate (same sha256 as a queued, training or completed file) is not queued unless
    ``force``; its row comes back with state ``skipped`` and ``duplicate_of`` set. A file
    with a row over ``max_row_bytes`` comes back ``failed``, its error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if priority not in PRIORITY_LEVELS:
        raise UserError(f"--priority: must be one of high, normal, low, got {priority!r}")
    try:
        sha, problem = digest_and_check(path, max_row_bytes)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    name = os.fsencode(path.name).decode("utf-8", "replace")
    source = os.fsencode(path.absolute()).decode("utf-8", "surrogateescape")
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{name}: the path is not valid UTF-8; rename the file") from None
    row = ledger.add_file(name, source, "submit", sha, path.stat().st_size,
                          PRIORITY_LEVELS[priority], forced=force)
    try:
        return finish_incoming(home, ledger, row, refuse=problem)
    except UserError:  # a full disk: the copy is not there; say so in the ledger if it can
        with contextlib.suppress(UserError):
            ledger.set_file(row["id"], state="failed", finished_at=time.time(),
                            error="not taken in: the disk was full; submit it again")
        raise


def finish_incoming(home: Home, ledger: Ledger, row: dict[str, Any],
                    refuse: str | None = None) -> dict[str, Any]:
    """Put an ``incoming`` file in place and decide queued, skipped or -- ``refuse``: why
    it cannot be trained -- failed (idempotent). A file that cannot be put in place fails with
    the reason; only a full disk leaves it ``incoming`` (finished at the next start)."""
    dup = None if row["forced"] or refuse else ledger.find_duplicate(row["sha256"])
    if dup is not None and dup["id"] == row["id"]:
        dup = None
    target_state = "failed" if refuse else "queued" if dup is None else "skipped"
    dest = home.folder(target_state) / row["fname"]
    source = Path(row["source"])
    try:
        if not dest.exists():
            if row["origin"] == "inbox":
                if source.exists():
                    os.replace(source, dest)
            elif source.exists():
                tmp = dest.with_name(f".{dest.name}.tmp")
                try:
                    shutil.copyfile(source, tmp)
                    with open(tmp, "rb") as fh:
                        os.fsync(fh.fileno())
                    os.replace(tmp, dest)
                finally:
                    tmp.unlink(missing_ok=True)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(f"{source}: the disk is full; free space and submit it again"
                            ) from None
        ledger.set_file(row["id"], state="failed", finished_at=time.time(),
                        error=f"cannot take the file in: {exc.strerror or exc}")
        return ledger.file(row["id"])
    if not dest.exists():
        ledger.set_file(row["id"], state="failed", error="file vanished before it was taken in",
                        finished_at=time.time())
        return ledger.file(row["id"])
    if refuse:
        from trainer_core.daemon.reports import write_report

        ledger.set_file(row["id"], state="failed", error=refuse, finished_at=time.time())
        write_report(home, ledger, row["id"])
    elif dup is None:
        ledger.set_file(row["id"], state="queued")
    else:
        from trainer_core.daemon.reports import write_report

        ledger.set_file(row["id"], state="skipped", duplicate_of=dup["id"],
                        error=f"duplicate of #{dup['id']} {dup['name']} ({dup['state']}); "
                              "not trained again (submit with --force to train it anyway)",
                        finished_at=time.time())
        write_report(home, ledger, row["id"])
    return ledger.file(row["id"])
