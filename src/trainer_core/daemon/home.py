"""A daemon home: its folder layout, its OS lock, and the priority names.

::

    HOME/
      inbox/            drop data files here (.jsonl .json .parquet .csv .tsv; subfolders
                        allowed: inbox/high/, inbox/low/)
      queue/            files taken in, waiting or in training (named <id>-<name>)
      completed/        trained files, each with <file>.report.json
      failed/           files that failed max_attempts times, with their report
      skipped/          skipped files and duplicates, with their report
      checkpoints/      step-NNNNNN/ (weights, optimizer, schedule, RNG, data position)
      models/           published models; ``current`` is a symlink to the newest
      current -> models/step-NNNNNN
      snapshots/        YYYY-MM-DD/ daily copies of the current model
      tokenizer/        the tokenizer, saved once, linked into every published model
      logs/             daemon.log, worker.log, metrics.jsonl (one line per step)
      ledger.sqlite     the job ledger (WAL)
      config.json       the resolved training config the daemon runs with
      status.json       live state for `trainer daemon status` and dashboards
      daemon.lock       flock'ed by the running daemon (and its worker)
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from trainer_core.errors import UserError
from trainer_core.files import DAEMON_LOG_DIR, METRICS_FILE, STATUS_FILE

PRIORITY_LEVELS = {"high": 2, "normal": 1, "low": 0}
#: Folder of each final ledger state.
STATE_FOLDERS = {"queued": "queue", "training": "queue", "incoming": "queue",
                 "completed": "completed", "failed": "failed", "skipped": "skipped"}
REPORT_SUFFIX = ".report.json"
#: Names a writer uses while a file is incomplete: never taken from the inbox.
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")


def priority_name(level: int) -> str:
    """2 high, 1 normal, 0 low; below 0 only retried files (``retry``)."""
    for name, value in PRIORITY_LEVELS.items():
        if level == value:
            return name
    return "high" if level > 2 else "retry"


class Home:
    """Paths inside one daemon home (nothing is created until :meth:`create`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        r = self.root
        self.inbox = r / "inbox"
        self.queue = r / "queue"
        self.completed = r / "completed"
        self.failed = r / "failed"
        self.skipped = r / "skipped"
        self.checkpoints = r / "checkpoints"
        self.models = r / "models"
        self.current = r / "current"
        self.snapshots = r / "snapshots"
        self.tokenizer = r / "tokenizer"
        self.logs = r / DAEMON_LOG_DIR
        self.metrics = self.logs / METRICS_FILE  # one line per training step
        self.ledger = r / "ledger.sqlite"
        self.config = r / "config.json"
        self.status = r / STATUS_FILE
        self.lock = r / "daemon.lock"

    def create(self) -> None:
        for d in (self.inbox, self.inbox / "high", self.inbox / "low", self.queue,
                  self.completed, self.failed, self.skipped, self.checkpoints, self.models,
                  self.snapshots, self.logs):
            d.mkdir(parents=True, exist_ok=True)

    def folder(self, state: str) -> Path:
        return self.root / STATE_FOLDERS[state]

    def require(self) -> None:
        if not self.ledger.exists():
            raise UserError(f"{self.root}: not a daemon home (no ledger.sqlite); start one with "
                            f"`trainer daemon start --home {self.root}`")


class HomeLock:
    """One daemon per home: an exclusive ``flock`` on ``daemon.lock``, held while it runs.

    The kernel drops the lock when the process (and the worker, which inherits the descriptor)
    dies, however it dies, so there is never a stale lock to clean by hand. The pid written
    into the file is for people; liveness is the lock itself.
    """

    def __init__(self, home: Home):
        self.home = home
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.home.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.home.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> HomeLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def daemon_running(home: Home) -> int | None:
    """The running daemon's pid (from the lock file), or None when nobody holds the lock."""
    if not home.lock.exists():
        return None
    fd = os.open(home.lock, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = home.lock.read_text(encoding="utf-8").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
