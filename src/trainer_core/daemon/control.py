"""What ``trainer daemon`` commands do from another terminal (no torch imported here).

Control commands (pause, resume, stop, skip, retry) go through the ledger's ``commands`` table:
the running daemon executes them in order and writes the result back, which the command waits
for. With no daemon running, the command holds the home lock itself and changes the ledger
directly (retry, skip of a queued file, pause/resume) or says there is nothing to stop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from trainer_core.daemon.home import Home, HomeLock, daemon_running, priority_name
from trainer_core.daemon.ledger import Ledger
from trainer_core.errors import UserError

COMMANDS = ("pause", "resume", "stop", "skip", "retry")


def open_ledger(home: Home) -> Ledger:
    home.require()
    return Ledger(home.ledger)


def send(home: Home, cmd: str, arg: str | None = None, wait_s: float = 30.0) -> str:
    """Run a control command; returns its result line."""
    from trainer_core.daemon import service

    ledger = open_ledger(home)
    try:
        if daemon_running(home):
            cid = ledger.add_command(cmd, arg)
            deadline = time.time() + wait_s
            while time.time() < deadline:
                row = ledger.command(cid)
                if row["done_at"] is not None:
                    result = row["result"]
                    if result.startswith("error: "):
                        raise UserError(result.removeprefix("error: "))
                    return result
                if not daemon_running(home):
                    break
                time.sleep(0.1)
            return f"{cmd}: sent; the daemon has not answered yet (see `trainer daemon status`)"
        lock = HomeLock(home)
        if not lock.acquire():  # a daemon started meanwhile: let it do it
            ledger.add_command(cmd, arg)
            return f"{cmd}: sent"
        try:
            if cmd == "stop":
                return "no daemon is running"
            if cmd in ("pause", "resume"):
                ledger.put_meta("paused", 1 if cmd == "pause" else 0)
                return f"{cmd}d (no daemon running; it applies at the next start)"
            if cmd == "retry":
                force = bool(arg and arg.startswith("force:"))
                row = service.retry_file(home, ledger, (arg or "").removeprefix("force:"), force)
                return f"#{row['id']} {row['name']} queued again"
            if cmd == "skip":
                if not arg:
                    current = ledger.training()
                    if current is None:
                        raise UserError("no file is in training")
                    raise UserError(f"#{current['id']} {current['name']} was in training when "
                                    "the daemon stopped; start the daemon to skip it, or name it")
                row = service.find_file(ledger, arg)
                if row["state"] == "training":
                    # Not running: nothing to interrupt; the attempt ends here, and the next
                    # start drops its checkpoints (the model stays at the committed step).
                    row = service.skip_interrupted(home, ledger, row)
                    return f"#{row['id']} {row['name']} skipped"
                row = service.skip_queued(home, ledger, row)
                return f"#{row['id']} {row['name']} skipped"
            raise UserError(f"unknown command {cmd!r}")
        finally:
            lock.release()
    finally:
        ledger.close()


def submit_files(home: Home, paths: list[Path], priority: str, force: bool) -> list[dict]:
    """``trainer daemon submit``: copy each file into the queue (creating the home if new)."""
    from trainer_core.daemon.intake import submit

    home.create()
    ledger = Ledger(home.ledger)
    limit = int(_daemon_setting(home, "max_row_mb", 16.0) * (1 << 20))
    try:
        return [submit(home, ledger, p, priority, force, limit) for p in paths]
    finally:
        ledger.close()


def _daemon_setting(home: Home, name: str, default: Any) -> Any:
    """A ``daemon`` setting from the home's config.json (the default when there is none)."""
    try:
        return json.loads(home.config.read_text(encoding="utf-8"))["daemon"][name]
    except (OSError, ValueError, KeyError, TypeError):
        return default


def status(home: Home) -> dict[str, Any]:
    """status.json of the running daemon, else what the ledger says (state ``stopped``)."""
    ledger = open_ledger(home)
    try:
        pid = daemon_running(home)
        data: dict[str, Any] = {}
        if home.status.exists():
            try:
                data = json.loads(home.status.read_text(encoding="utf-8"))
            except ValueError:
                data = {}
        if not pid:
            queued = ledger.queued()
            data.update(state="stopped", pid=None, current=None, counts=ledger.counts(),
                        paused=ledger.meta("paused") == "1",
                        model={**(data.get("model") or {}), "step": ledger.model_step(),
                               "checkpoint": ledger.meta("model_checkpoint")},
                        queue={"total": len(queued),
                               "next": [{"id": r["id"], "name": r["name"],
                                         "priority": priority_name(r["priority"]),
                                         "attempts": r["attempts"]} for r in queued[:10]]})
            training = ledger.training()
            if training is not None:
                data["interrupted"] = {"id": training["id"], "name": training["name"],
                                       "attempt": training["attempts"]}
        return data
    finally:
        ledger.close()


def history(home: Home, limit: int | None) -> list[dict[str, Any]]:
    ledger = open_ledger(home)
    try:
        return list(reversed(ledger.attempts(limit)))
    finally:
        ledger.close()


def precheck_start(home: Home, cfg: Any) -> None:
    """The start's refusals (a ledger older than the home, another model, changed settings)
    before anything is saved; the daemon checks again once it holds the home lock."""
    from trainer_core.daemon import service

    # No ledger yet: an empty one in memory (nothing is created on disk by a refusal).
    ledger = Ledger(home.ledger if home.ledger.is_file() else Path(":memory:"))
    try:
        service.check_ledger_matches_home(home, ledger)
        service.check_start(home, cfg, ledger)
    finally:
        ledger.close()


def start_detached(home: Home, cfg: Any, wait_s: float = 60.0) -> int:
    """Start the daemon on ``cfg`` in the background; returns its pid once it holds the home
    lock. Each start has its own config file and output until then, so two starts at once
    never swap configs or errors: the one that wins the lock moves its output to
    logs/daemon.out; the other exits with its own error."""
    from trainer_core.config import to_dict
    from trainer_core.files import write_json_atomic

    home.create()
    nonce = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    config = home.logs / f".start-{nonce}.json"
    early = home.logs / f".start-{nonce}.out"
    write_json_atomic(config, to_dict(cfg))
    out = open(early, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "trainer_core", "daemon", "start", "--home",
                             str(home.root), "--config", str(config), "--detached-child"],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            start_new_session=True, env=dict(os.environ))
    out.close()
    try:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if proc.poll() is not None:
                tail = early.read_text(encoding="utf-8", errors="replace")
                errors = [ln for ln in tail.splitlines() if ln.startswith("error: ")]
                last = errors[-1:] or tail.strip().splitlines()[-1:] or ["(no output)"]
                raise UserError(f"the daemon exited at once: {last[0].removeprefix('error: ')}")
            if daemon_running(home) == proc.pid:
                return proc.pid
            time.sleep(0.1)
        return proc.pid
    finally:
        config.unlink(missing_ok=True)
        early.unlink(missing_ok=True)


def detached_output(home: Home) -> Any:
    """For a detached daemon: a function that sends its output to logs/daemon.out, called
    once its start is accepted (before that, errors go to the starting command)."""
    def redirect() -> None:
        fd = os.open(home.logs / "daemon.out", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    return redirect
