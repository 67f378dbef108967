"""The dashboard's daemon view: a daemon home's queue, history, current file and controls.

``trainer dashboard HOME`` on a daemon home serves this view (``cli/monitor_cmds.py`` composes
it into :func:`~trainer_core.monitor.dashboard.server.make_server`; the monitor package, below
the daemon in the layering, knows nothing about daemons). It follows the view protocol of
:mod:`trainer_core.monitor.dashboard.views`:

* ``GET /api/daemon/state``: everything the page shows (see :meth:`DaemonView.snapshot`);
* ``GET /api/daemon/events?metrics=OFFSET``: server-sent events ``metrics`` (new lines of
  ``logs/metrics.jsonl``), ``status``, ``queue`` and ``history`` (sent when they change);
* ``POST /api/daemon/pause|resume|skip`` (``skip`` takes ``{"id": N}`` for a queued file, else
  the file in training): the same control commands as ``trainer daemon pause|resume|skip``
  (:func:`trainer_core.daemon.control.send`), so they go through the ledger to the running
  daemon, or change the ledger directly when none runs. The server checks the token first.

Everything is read from the home's files (``status.json``, ``ledger.sqlite`` read through a
short-lived connection, ``logs/metrics.jsonl``); the view needs no connection to the daemon.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from importlib import resources
from pathlib import Path
from typing import Any

from trainer_core.daemon import control
from trainer_core.daemon.home import Home, priority_name
from trainer_core.daemon.ledger import Ledger
from trainer_core.errors import UserError
from trainer_core.monitor.dashboard.base import HTTPError
from trainer_core.monitor.dashboard.views import JsonlTail, poll_stream

POLL_S = 0.5
#: Status is re-read at least this often even when nothing changed (a daemon that died
#: leaves status.json as it was; ``control.status`` asks the home lock).
STATUS_EVERY_S = 3.0
HISTORY_KEPT = 50
#: The page starts from the last this-many bytes of logs/metrics.jsonl (it grows for the
#: daemon's whole life); live records follow through the events.
METRICS_TAIL_BYTES = 256 * 1024
#: Seconds an action waits for the running daemon's answer (it answers at its next tick).
ACTION_WAIT_S = 10.0
ACTIONS = ("pause", "resume", "skip")


def is_daemon_home(path: Path) -> bool:
    """Whether ``path`` is a daemon home (it has a ledger, even if no daemon ever ran)."""
    return Home(path).ledger.is_file()


def _queue_row(position: int, r: dict[str, Any]) -> dict[str, Any]:
    return {"position": position, "id": r["id"], "name": r["name"],
            "priority": priority_name(r["priority"]), "attempts": r["attempts"],
            "size": r["size"], "origin": r["origin"], "submitted_at": r["submitted_at"],
            "error": r["error"]}


def _history_row(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "name", "state", "attempts", "steps", "tokens", "step_before", "step_after",
            "loss_start", "loss_end", "error", "duplicate_of", "finished_at")
    return {k: r[k] for k in keys}


class DaemonView:
    """One daemon home as a dashboard tab (the view protocol of ``monitor.dashboard.views``)."""

    def __init__(self, home: Home | Path | str, history_kept: int = HISTORY_KEPT):
        self.home = home if isinstance(home, Home) else Home(home)
        self.history_kept = history_kept

    # ----------------------------------------------------------------- reading the home

    def _require(self) -> None:
        try:
            self.home.require()
        except UserError as exc:
            raise HTTPError(404, str(exc)) from None

    def _ledger(self) -> Ledger:
        self._require()
        return Ledger(self.home.ledger)

    def queue(self, ledger: Ledger) -> list[dict[str, Any]]:
        """Waiting files in the order they will train (what runs next first)."""
        return [_queue_row(i, r) for i, r in enumerate(ledger.queued(), 1)]

    def history(self, ledger: Ledger) -> list[dict[str, Any]]:
        """Finished files (completed, failed, skipped), the newest first."""
        rows = ledger.files("state IN ('completed', 'failed', 'skipped')",
                            order=f"finished_at DESC, id DESC LIMIT {int(self.history_kept)}")
        return [_history_row(r) for r in rows]

    def status(self) -> dict[str, Any]:
        """``trainer daemon status --json``: status.json while a daemon runs, else the ledger."""
        try:
            return control.status(self.home)
        except UserError as exc:
            raise HTTPError(404, str(exc)) from None

    def metrics_tail(self) -> JsonlTail:
        """A reader positioned at the start of the last complete lines of the metrics file."""
        path = self.home.metrics
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size <= METRICS_TAIL_BYTES:
                    return JsonlTail(path, 0)
                fh.seek(size - METRICS_TAIL_BYTES)
                fh.readline()  # the partial line the window starts in
                return JsonlTail(path, fh.tell())
        except OSError:
            return JsonlTail(path, 0)

    def snapshot(self) -> dict[str, Any]:
        """What the page shows, with the metrics file offset it has read up to (the page
        passes it back to ``events`` so that no line is sent twice)."""
        metrics = self.metrics_tail()
        records = metrics.read()
        with closing(self._ledger()) as ledger:
            queue, history, counts = self.queue(ledger), self.history(ledger), ledger.counts()
        return {"home": str(self.home.root), "name": self.home.root.name,
                "status": self.status(), "queue": queue, "history": history, "counts": counts,
                "metrics": records, "offsets": {"metrics": metrics.offset}}

    # ----------------------------------------------------------------- the view protocol

    def script(self) -> bytes:
        return resources.files(__package__).joinpath("static/daemon.js").read_bytes()

    def get(self, what: str, query: dict[str, str]) -> Any:
        if what == "state":
            return self.snapshot()
        lists = {"queue": self.queue, "history": self.history}
        if what in lists:
            with closing(self._ledger()) as ledger:
                return lists[what](ledger)
        raise HTTPError(404, f"unknown daemon/{what}")

    def events(self, query: dict[str, str], stopping: Any) -> Iterator[tuple[str | None, Any]]:
        """New metrics lines at once; status, queue and history when they change (the ledger's
        ``PRAGMA data_version`` says when another connection committed)."""
        try:
            start = max(int(query.get("metrics", "0")), 0)
        except ValueError:
            raise HTTPError(400, "bad metrics offset") from None
        self._require()  # before the stream starts: a plain 404, not an empty stream
        metrics = JsonlTail(self.home.metrics, start)

        last: dict[str, Any] = {}
        version = None
        status_mtime = 0.0
        last_status = 0.0

        def poll(ledger: Ledger) -> Iterator[tuple[str, Any]]:
            nonlocal version, status_mtime, last_status
            records = metrics.read()
            if records:
                yield "metrics", records
            now = time.monotonic()
            try:
                v = ledger.db.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error:
                v = version
            try:
                mtime = self.home.status.stat().st_mtime
            except OSError:
                mtime = 0.0
            if v != version or mtime != status_mtime or now - last_status >= STATUS_EVERY_S:
                version, status_mtime, last_status = v, mtime, now
                fresh = {"status": self.status(), "queue": self.queue(ledger),
                         "history": self.history(ledger)}
                for name, data in fresh.items():
                    # status always (its age matters); the lists only when changed
                    if name == "status" or data != last.get(name):
                        last[name] = data
                        yield name, data

        def gen() -> Iterator[tuple[str | None, Any]]:
            with closing(self._ledger()) as ledger:
                yield from poll_stream(lambda: poll(ledger), stopping, POLL_S)

        return gen()

    def action(self, name: str, query: dict[str, str], body: dict[str, Any]) -> Any:
        if name not in ACTIONS:
            raise HTTPError(404, f"unknown action {name!r}")
        arg = None
        if name == "skip":
            ref = body.get("id", query.get("id"))
            if ref not in (None, ""):
                # Only a number: a name could match another file than the one on the page.
                if isinstance(ref, bool) or not str(ref).isdigit():
                    raise HTTPError(400, "id must be a file's number")
                arg = f"#{int(ref)}"
        self._require()
        try:
            result = control.send(self.home, name, arg, wait_s=ACTION_WAIT_S)
        except UserError as exc:
            raise HTTPError(409, str(exc)) from None
        return {"ok": True, "action": name, "result": result}
