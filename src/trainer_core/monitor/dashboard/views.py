"""The dashboard's run views: the runs under DIR, one run's data, its live events, stop.

A view is an object with three methods the server calls:

* ``get(what, query) -> JSON``: ``GET /api/<view>/<what>``;
* ``events(query, stopping) -> iterator of (event name | None, data)``: server-sent events
  (``None`` = keep-alive); it must end soon after ``stopping`` is set;
* ``action(name, query, body) -> JSON``: ``POST /api/<view>/<name>`` (token already checked);
* ``script() -> bytes``: its JavaScript, served as ``/static/<view>.js``; it registers
  ``TD.views.<view> = {title, mount(container), unmount()}`` using the helpers of ``app.js``
  (``TD.api``, ``TD.post``, ``TD.chart``, ``TD.el``).

Everything comes from the run's files (status.json, metrics.jsonl, previews.jsonl, run.json), so
the dashboard works for runs started anywhere, finished or running, and needs no connection
to the training process.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from trainer_core.files import (
    METRICS_FILE,
    PREVIEWS_FILE,
    RUN_MANIFEST,
    STATUS_FILE,
    run_lock_holder,
)
from trainer_core.monitor.dashboard.base import HTTPError, safe_path
from trainer_core.monitor.status import read_status
from trainer_core.monitor.watch import find_runs, is_run_dir

POLL_S = 0.5
RUNS_EVERY_S = 5.0
PREVIEW_STEPS_KEPT = 5
#: Seconds without an event after which a stream sends a keep-alive comment (it also tells
#: the server that the page went away).
KEEPALIVE_S = 15.0


def poll_stream(poll: Callable[[], Iterable[tuple[str, Any]]], stopping: Any,
                every_s: float = POLL_S) -> Iterator[tuple[str | None, Any]]:
    """A view's event stream: the events ``poll()`` returns, every ``every_s`` seconds until
    ``stopping`` is set, and a keep-alive ``(None, None)`` after :data:`KEEPALIVE_S` seconds
    without one."""
    last_sent = time.monotonic()
    while not stopping.is_set():
        sent = False
        for event in poll():
            yield event
            sent = True
        now = time.monotonic()
        if sent:
            last_sent = now
        elif now - last_sent >= KEEPALIVE_S:
            last_sent = now
            yield None, None
        stopping.wait(every_s)


class JsonlTail:
    """Reads complete new lines of a growing JSONL file from a byte offset."""

    def __init__(self, path: Path, offset: int = 0):
        self.path = path
        self.offset = offset

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self.offset:  # the file was replaced: start over
                    self.offset = 0
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunsView:
    """Runs under ``root`` (``root`` itself may be a run)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    # ----------------------------------------------------------------- helpers

    def run_dir(self, run_id: str | None) -> Path:
        if run_id is None:
            raise HTTPError(400, "missing id")
        d = safe_path(self.root, run_id)
        if not is_run_dir(d):
            raise HTTPError(404, f"no run {run_id!r}")
        return d

    def run_id(self, d: Path) -> str:
        rel = d.resolve().relative_to(self.root).as_posix()
        return rel if rel != "." else "."

    def summary(self, d: Path) -> dict[str, Any]:
        s = read_status(d) or {}
        state = s.get("state", "unknown")
        if state == "running" and s.get("process_alive") is False:
            state = "dead"
        elif state == "running" and s.get("stalled"):
            state = "stalled"
        return {"id": self.run_id(d), "name": d.name if d != self.root else self.root.name,
                "state": state, "step": s.get("step"), "total_steps": s.get("total_steps"),
                "loss": s.get("loss"), "eval_loss": s.get("eval_loss"),
                "alerts": len(s.get("alerts") or []), "updated_at": s.get("updated_at")}

    # ----------------------------------------------------------------- the view protocol

    def script(self) -> bytes:
        return resources.files(__package__).joinpath("static/runs.js").read_bytes()

    def runs(self) -> tuple[list[Path], list[str]]:
        """Run directories under the root, and the names skipped because they resolve outside
        it (a symlink in DIR pointing elsewhere is never followed out of DIR)."""
        inside, skipped = [], []
        for d in find_runs(self.root):
            resolved = d.resolve()
            if resolved == self.root or self.root in resolved.parents:
                inside.append(d)
            else:
                skipped.append(os.path.relpath(d, self.root))
        return inside, skipped

    def get(self, what: str, query: dict[str, str]) -> Any:
        if what == "list":
            return [self.summary(d) for d in self.runs()[0]]
        if what == "skipped":
            return [{"name": n, "reason": "resolves outside the dashboard's directory"}
                    for n in self.runs()[1]]
        if what == "run":
            return self.snapshot(self.run_dir(query.get("id")))
        raise HTTPError(404, f"unknown runs/{what}")

    def snapshot(self, d: Path) -> dict[str, Any]:
        """Everything the page shows for one run, with the file offsets it has read up to
        (the page passes them back to ``events`` so that nothing is sent twice)."""
        metrics = JsonlTail(d / METRICS_FILE)
        records = metrics.read()
        previews = JsonlTail(d / PREVIEWS_FILE)
        preview_recs = previews.read()
        steps: set[int] = {p["step"] for p in preview_recs if isinstance(p.get("step"), int)}
        keep = sorted(steps)[-PREVIEW_STEPS_KEPT:]
        plot = d / "loss.svg"
        return {
            "id": self.run_id(d), "name": d.name,
            "status": read_status(d) or {},
            "metrics": [r for r in records if "alert" not in r],
            "alert_log": [r for r in records if "alert" in r],
            "previews": [p for p in preview_recs if p.get("step") in keep],
            "manifest": _read_json(d / RUN_MANIFEST) or {},
            "plot": f"/files/{self.run_id(d)}/loss.svg" if plot.exists() else None,
            "offsets": {"metrics": metrics.offset, "previews": previews.offset},
        }

    def events(self, query: dict[str, str], stopping: Any) -> Iterator[tuple[str | None, Any]]:
        """New metrics records, alerts, previews and status of one run; the runs list every
        few seconds. Polls the files (cheap: a stat and a read of what was appended)."""
        d = self.run_dir(query.get("id"))

        def offset(key: str) -> int:
            try:
                return max(int(query.get(key, "0")), 0)
            except ValueError:
                raise HTTPError(400, f"bad {key}") from None

        metrics = JsonlTail(d / METRICS_FILE, offset("metrics"))
        previews = JsonlTail(d / PREVIEWS_FILE, offset("previews"))
        status_mtime = 0.0
        last_runs = 0.0

        def poll() -> Iterator[tuple[str, Any]]:
            nonlocal status_mtime, last_runs
            records = metrics.read()
            steps = [r for r in records if "alert" not in r]
            alerts = [r for r in records if "alert" in r]
            if steps:
                yield "metrics", steps
            if alerts:
                yield "alerts", alerts
            new_previews = previews.read()
            if new_previews:
                yield "previews", new_previews
            try:
                mtime = (d / STATUS_FILE).stat().st_mtime
            except OSError:
                mtime = 0.0
            now = time.monotonic()
            # Re-sent every few seconds even if unchanged: "stalled" is judged by the clock.
            if mtime != status_mtime or now - last_runs >= RUNS_EVERY_S:
                status_mtime = mtime
                yield "status", read_status(d) or {}
            if now - last_runs >= RUNS_EVERY_S:
                last_runs = now
                yield "runs", [self.summary(r) for r in self.runs()[0]]

        return poll_stream(poll, stopping)

    def action(self, name: str, query: dict[str, str], body: dict[str, Any]) -> Any:
        if name != "stop":
            raise HTTPError(404, f"unknown action {name!r}")
        d = self.run_dir(query.get("id") or body.get("id"))
        s = read_status(d) or {}
        pid = s.get("pid")
        if (s.get("state") != "running" or s.get("process_alive") is not True
                or not isinstance(pid, int)):
            raise HTTPError(409, "the run is not running on this machine")
        if s.get("stalled"):  # stale status: its pid may belong to another process by now
            raise HTTPError(409, "the run's status is stale; stop it from its terminal")
        # Only the process that holds the run's lock is that run: status.json is a file
        # anyone can write, and its pid could name any process of the user.
        if run_lock_holder(d) != pid:
            raise HTTPError(409, "the process named in status.json does not hold the run's "
                                 "lock; not signalled")
        # The run saves a checkpoint and ends as interrupted (train.signals); --resume continues.
        os.kill(pid, signal.SIGTERM)
        return {"ok": True, "signal": "SIGTERM", "pid": pid}
