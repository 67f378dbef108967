"""The daemon: takes files in, feeds them to the training worker one at a time, commits results.

The loop (a tick every 0.1 s): control commands from the ledger, an inbox scan every
``daemon.poll_interval_s``, the worker's messages, then -- when the worker is idle -- the next
file (an interrupted one first, then by priority). The daemon never imports torch; the worker
(a child process, restarted if it dies) does the training.

The life of a file, each step committed to the ledger before anything is moved::

    inbox/ or submit -> incoming -> queued -> training -> completed  (completed/ + report)
                                        ^         |--> queued, one priority lower (attempt failed)
                                        |         |--> failed      (failed/ + report, last attempt)
                                        retry     '--> skipped     (skipped/ + report, `skip`)

A finished file: the worker writes the checkpoint (its state says "complete"), the daemon
publishes it as the current model, commits the ledger (state, steps, tokens, model step
before/after), then writes the report and moves the file. A kill between any two of these is
finished by the next start (:meth:`Daemon.reconcile` and the "complete" checkpoint), so no file
is lost or trained twice. A failed attempt never advances the model: the checkpoints it wrote
are deleted and the next file starts from the last committed one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from trainer_core.config import TrainerConfig, to_dict
from trainer_core.daemon import storage
from trainer_core.daemon.home import PRIORITY_LEVELS, STATE_FOLDERS, Home, HomeLock, priority_name
from trainer_core.daemon.intake import InboxWatcher, finish_incoming, take_from_inbox
from trainer_core.daemon.ledger import Ledger
from trainer_core.daemon.reports import problems_path, report_path, write_report
from trainer_core.errors import UserError
from trainer_core.files import append_jsonl, write_json_atomic

TICK_S = 0.1
HOUSEKEEPING_S = 30.0


# --------------------------------------------------------------------------- ledger operations
# Shared by the daemon and by the CLI when no daemon runs (it then holds the home lock itself).


def place_file(home: Home, ledger: Ledger, fid: int, rewrite: bool = True) -> None:
    """Move a file to the folder of its ledger state, writing its report when final
    (``rewrite=False``: only a missing report, as a restart's reconcile does)."""
    row = ledger.file(fid)
    if row["fname"] is None or row["state"] == "incoming":
        return
    dest = home.folder(row["state"]) / row["fname"]
    if not dest.exists():
        for folder in set(STATE_FOLDERS.values()):
            src = home.root / folder / row["fname"]
            if src.exists():
                os.replace(src, dest)
                break
    if row["state"] in ("completed", "failed", "skipped"):
        if rewrite or not report_path(home, row).exists():
            write_report(home, ledger, fid)
    else:  # back in the queue (retry): its old report goes
        for folder in ("completed", "failed", "skipped"):
            (home.root / folder / (row["fname"] + ".report.json")).unlink(missing_ok=True)


def find_file(ledger: Ledger, ref: str) -> dict[str, Any]:
    """A file by ``#id``/``id``, stored name, name or source path (newest match wins)."""
    key = ref.lstrip("#")
    if key.isdigit():
        try:
            return ledger.file(int(key))
        except KeyError:
            pass
    rows = ledger.files("fname=? OR name=? OR source=? OR source=?",
                        (Path(ref).name, ref, ref, str(Path(ref).absolute())), order="id DESC")
    if not rows:
        raise UserError(f"{ref}: no such file in the ledger (see `trainer daemon history`)")
    return rows[0]


def retry_file(home: Home, ledger: Ledger, ref: str, force: bool = False) -> dict[str, Any]:
    row = find_file(ledger, ref)
    allowed = ("failed", "skipped") + (("completed",) if force else ())
    if row["state"] not in allowed:
        hint = " (pass --force to train a completed file again)" if row["state"] == "completed" \
            else ""
        raise UserError(f"#{row['id']} {row['name']} is {row['state']}; only failed or skipped "
                        f"files can be retried{hint}")
    with ledger.tx() as db:
        ledger.update(db, row["id"], state="queued", attempts=0, error=None,
                      priority=PRIORITY_LEVELS["normal"], seq=ledger.next_seq(db),
                      forced=int(force or row["forced"]), finished_at=None)
    place_file(home, ledger, row["id"])
    return ledger.file(row["id"])


def skip_queued(home: Home, ledger: Ledger, row: dict[str, Any]) -> dict[str, Any]:
    if row["state"] != "queued":
        raise UserError(f"#{row['id']} {row['name']} is {row['state']}, not queued")
    ledger.set_file(row["id"], state="skipped", error="skipped by the user before training",
                    finished_at=time.time())
    place_file(home, ledger, row["id"])
    return ledger.file(row["id"])


# --------------------------------------------------------------------------- the worker handle


class WorkerHandle:
    """The training child process and a thread turning its stdout into events.

    ``nproc`` > 1: the child is ``torchrun`` running the worker in ``nproc`` processes (rank 0
    speaks the protocol on the inherited pipes). torchrun gets a session of its own, so a
    Ctrl-C in the terminal reaches only the daemon, which stops the worker through the
    protocol; it gets SIGKILL if the daemon dies, and its ranks die with it.
    """

    def __init__(self, home: Home, lock_fd: int | None, log: Path, nproc: int = 1):
        self.events: queue.Queue = queue.Queue()
        self.log = open(log, "ab")  # noqa: SIM115 - closed in close()
        env = dict(os.environ)
        cmd = [sys.executable, "-m", "trainer_core.daemon.worker", str(home.root)]
        extra: dict[str, Any] = {}
        if nproc > 1:
            from trainer_core.train.distributed import torchrun_command

            cmd = torchrun_command(nproc, [str(home.root)], module="trainer_core.daemon.worker")
            extra = {"start_new_session": True, "preexec_fn": _parent_death_kill()}
        self.command = cmd
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
            # The worker holds the home lock too: no new daemon can start while it lives.
            pass_fds=(lock_fd,) if lock_fd is not None else (), **extra,
        )
        self.state = "starting"
        self.started_at = time.time()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue
        self.events.put({"event": "exit", "code": self.proc.wait()})

    def send(self, msg: dict[str, Any]) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the exit event follows

    def close(self, timeout: float = 30.0) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _parent_death_kill() -> Any:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when the daemon dies (the worker
    does this for itself; torchrun does not). Resolved here: the forked child only calls it."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: closed stdin still ends rank 0, then all
        return None

    def child() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return child


# --------------------------------------------------------------------------- the daemon


class Daemon:
    """One daemon on one home; :meth:`run` blocks until stopped and returns the exit code."""

    def __init__(self, home: Home, cfg: TrainerConfig, stream: TextIO | None = None):
        self.home = home
        self.cfg = cfg
        self.d = cfg.daemon
        self.stream = stream
        self.lock = HomeLock(home)
        self.worker: WorkerHandle | None = None
        self.job: dict[str, Any] | None = None  # the file in training and its progress
        self.stopping = False
        self.exit_code = 0
        self.state = "starting"
        self.started_at = time.time()
        self.spawn_failures = 0
        self.next_spawn = 0.0
        self.last_scan = 0.0
        self.last_housekeeping = 0.0
        self.last_status = 0.0
        self.disk: dict[str, Any] = {}
        self.managed_gb: float | None = None
        self.rate_tokens_per_s = 0.0

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        if not self.lock.acquire():
            from trainer_core.daemon.home import daemon_running

            raise UserError(f"{self.home.root}: a daemon is already running here "
                            f"(pid {daemon_running(self.home)}); one daemon per home")
        try:
            self.home.create()
            write_json_atomic(self.home.config, to_dict(self.cfg))
            self.ledger = Ledger(self.home.ledger)
            self.watcher = InboxWatcher(self.home, self.d.settle_s)
            old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
            self.log(f"daemon started in {self.home.root} (pid {os.getpid()})")
            try:
                self.reconcile()
                self.loop()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
                if self.worker is not None:
                    self.worker.close()
                self.state = "stopped"
                self.job = None
                self.write_status(force=True)
                self.log("daemon stopped")
                self.ledger.close()
        finally:
            self.lock.release()
        return self.exit_code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stopping:  # second signal: stop without waiting for the worker
            raise KeyboardInterrupt
        self.request_stop(f"signal {signum}")

    def request_stop(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.log(f"stopping ({why})")
        if self.worker is not None:
            # Training: checkpoint at the next step boundary and exit; idle: just exit.
            self.worker.send({"cmd": "stop"})

    def log(self, msg: str) -> None:
        line = f"{dt.datetime.now().isoformat(timespec='seconds')} {msg}"
        with open(self.home.logs / "daemon.log", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        if self.stream is not None:
            print(line, file=self.stream, flush=True)

    def loop(self) -> None:
        while True:
            self.handle_commands()
            now = time.time()
            if not self.stopping and now - self.last_scan >= self.d.poll_interval_s:
                self.last_scan = now
                self.scan_inbox()
            self.pump_worker(TICK_S)
            if self.stopping and (self.worker is None or self.worker.state in ("down", "exited")):
                return
            if not self.stopping:
                self.ensure_worker()
                self.maybe_start_work()
                if time.time() - self.last_housekeeping >= HOUSEKEEPING_S:
                    self.housekeeping()
            self.write_status()

    # ------------------------------------------------------------------ startup

    def reconcile(self) -> None:
        """Finish whatever a kill interrupted: intake, moves, reports, publishing, rollbacks."""
        home, ledger = self.home, self.ledger
        for row in ledger.files("state='incoming'"):
            finish_incoming(home, ledger, row)
        for row in ledger.files("state NOT IN ('incoming')"):
            place_file(home, ledger, row["id"], rewrite=False)
        storage.remove_incomplete(home)
        model_ckpt = self.model_checkpoint()
        if model_ckpt is not None:
            storage.publish(home, model_ckpt)
        self.drop_stale_checkpoints()

    def model_checkpoint(self) -> Path | None:
        rel = self.ledger.meta("model_checkpoint")
        return self.home.root / rel if rel else None

    def resume_checkpoint(self, row: dict[str, Any]) -> Path | None:
        """The newest checkpoint of this file's current attempt, if one survived."""
        model_step = self.ledger.model_step()
        for path in reversed(storage.checkpoints(self.home)):
            if storage.step_of(path) <= model_step:
                break
            info = storage.checkpoint_state(path).get("daemon") or {}
            if info.get("file_id") == row["id"] and info.get("attempt") == row["attempts"]:
                return path
        return None

    def drop_stale_checkpoints(self) -> None:
        """Checkpoints past the committed model that no resumable attempt owns (rollback)."""
        model_step = self.ledger.model_step()
        current = self.ledger.training()
        keep = self.resume_checkpoint(current) if current else None
        for path in storage.checkpoints(self.home):
            if storage.step_of(path) > model_step and path != keep:
                storage.remove_tree(path)

    # ------------------------------------------------------------------ intake and commands

    def scan_inbox(self) -> None:
        for path in self.watcher.ready():
            try:
                row = take_from_inbox(self.home, self.ledger, path, self.d.default_priority)
            except OSError as exc:
                self.log(f"cannot take {path}: {exc}")
                continue
            self.watcher.forget(path)
            what = ("queued" if row["state"] == "queued" else
                    f"{row['state']}: {row['error']}")
            self.log(f"#{row['id']} {row['name']} ({priority_name(row['priority'])}) {what}")

    def handle_commands(self) -> None:
        for c in self.ledger.pending_commands():
            try:
                result = self.command(c["cmd"], c["arg"])
            except UserError as exc:
                result = f"error: {exc}"
            self.ledger.finish_command(c["id"], result)
            self.log(f"command {c['cmd']}{' ' + c['arg'] if c['arg'] else ''}: {result}")
            self.write_status(force=True)

    def command(self, cmd: str, arg: str | None) -> str:
        ledger = self.ledger
        if cmd == "pause":
            ledger.put_meta("paused", 1)
            if self.job is not None and self.worker is not None and self.worker.state == "busy":
                self.worker.send({"cmd": "pause"})
                return "pausing at the next step boundary"
            return "paused"
        if cmd == "resume":
            ledger.put_meta("paused", 0)
            return "resumed"
        if cmd == "stop":
            self.request_stop("stop command")
            return "stopping"
        if cmd == "skip":
            current = ledger.training()
            row = find_file(ledger, arg) if arg else current
            if row is None:
                raise UserError("no file is in training; name one to skip a queued file")
            if current is None or row["id"] != current["id"]:
                skip_queued(self.home, ledger, row)
                return f"#{row['id']} {row['name']} skipped"
            if self.job is not None and self.worker is not None and self.worker.state == "busy":
                self.worker.send({"cmd": "skip"})
                return f"skipping #{row['id']} {row['name']} at the next step boundary"
            self.end_attempt(row, "skipped", "skipped by the user")
            return f"#{row['id']} {row['name']} skipped"
        if cmd == "retry":
            if arg is None:
                raise UserError("retry needs a file")
            force = arg.startswith("force:")
            row = retry_file(self.home, ledger, arg.removeprefix("force:"), force)
            return f"#{row['id']} {row['name']} queued again"
        raise UserError(f"unknown command {cmd!r}")

    # ------------------------------------------------------------------ the worker

    def ensure_worker(self) -> None:
        if self.worker is not None and self.worker.state not in ("down",):
            return
        if time.time() < self.next_spawn:
            return
        if self.worker is not None:
            self.worker.close(timeout=5)
        nproc = self.d.nproc
        self.worker = WorkerHandle(self.home, self.lock.fd, self.home.logs / "worker.log", nproc)
        if nproc > 1:
            import shlex

            shown = shlex.join(["torchrun", *self.worker.command[3:]])
            self.log(f"worker started under torchrun, {nproc} processes (pid "
                     f"{self.worker.proc.pid}): {shown}")
        else:
            self.log(f"worker started (pid {self.worker.proc.pid})")

    def pump_worker(self, timeout: float) -> None:
        if self.worker is None:
            time.sleep(timeout)
            return
        try:
            msg = self.worker.events.get(timeout=timeout)
        except queue.Empty:
            return
        while msg is not None:
            self.on_event(msg)
            try:
                msg = self.worker.events.get_nowait()
            except queue.Empty:
                msg = None

    def on_event(self, msg: dict[str, Any]) -> None:
        w = self.worker
        assert w is not None
        ev = msg["event"]
        if ev == "loaded":
            w.state = "idle"
            self.spawn_failures = 0
        elif ev == "ready":  # init: the base model is checkpoint step 0
            with self.ledger.tx() as db:
                self.ledger.set_meta(db, "model_checkpoint", self.rel(msg["checkpoint"]))
                self.ledger.set_meta(db, "model_step", 0)
            storage.publish(self.home, Path(msg["checkpoint"]))
            w.state = "idle"
            self.log("base model checkpointed as step 0 and published")
        elif ev == "started" and self.job is not None:
            self.job.update(file_step=msg["file_step"], file_steps=msg["file_steps"],
                            step=msg["step"])
            self.ledger.set_file(msg["file_id"], train_started_at=msg["time"])
            how = f"resumed at file step {msg['file_step']}" if msg["resumed"] else "started"
            self.log(f"#{self.job['id']} {self.job['name']} {how} "
                     f"({msg['file_steps']} steps, global step {msg['step']})")
        elif ev == "progress" and self.job is not None:
            append_jsonl(self.home.metrics,
                         {k: msg[k] for k in ("time", "step", "file_id", "file_step", "loss",
                                              "lr", "grad_norm", "tokens")})
            elapsed = time.time() - self.job["t0"]
            self.job.update(file_step=msg["file_step"], file_steps=msg["file_steps"],
                            step=msg["step"], loss=msg["loss"], lr=msg["lr"],
                            tokens=msg["tokens"])
            if elapsed > 0:
                self.rate_tokens_per_s = (msg["tokens"] - self.job["tokens0"]) / elapsed
        elif ev == "checkpoint" and self.job is not None:
            self.job["checkpoint"] = msg["checkpoint"]
        elif ev == "done":
            w.state = "idle"
            row = self.ledger.file(msg["file_id"])
            self.commit(row, Path(msg["checkpoint"]), msg)
        elif ev == "failed":
            # exiting: a rank died under torchrun; no new work until the exit is seen
            w.state = "exiting" if msg.get("exiting") else "idle"
            row = self.ledger.file(msg["file_id"])
            extra = {k: msg[k] for k in ("rows", "invalid_rows") if k in msg}
            self.end_attempt(row, "failed", msg["error"], **extra)
        elif ev == "skipped":
            w.state = "idle"
            self.end_attempt(self.ledger.file(msg["file_id"]), "skipped", "skipped by the user")
        elif ev == "paused":
            w.state = "idle"
            if self.job is not None:
                self.job["checkpoint"] = msg["checkpoint"]
            self.log(f"paused at global step {msg['step']} (checkpoint saved)")
        elif ev == "stopped":
            w.state = "exited"
            if msg.get("checkpoint"):
                self.log(f"worker stopped at global step {msg['step']} (checkpoint saved)")
        elif ev == "fatal":
            self.log(f"error: {msg['error']}")
            self.exit_code = 2
            self.request_stop("fatal worker error")
            w.state = "exited"
        elif ev == "log":
            self.log(msg["message"])
        elif ev == "exit":
            self.on_worker_exit(msg["code"])

    def on_worker_exit(self, code: int) -> None:
        assert self.worker is not None
        was = self.worker.state
        self.worker.state = "down"
        if self.stopping or was == "exited":
            return
        self.log(f"worker exited with code {code}")
        if self.job is not None:
            row = self.ledger.file(self.job["id"])
            resume = self.resume_checkpoint(row) if row["state"] == "training" else None
            info = storage.checkpoint_state(resume) if resume is not None else {}
            if resume is not None and (info.get("daemon") or {}).get("complete"):
                # It died after writing the file's final checkpoint: the file is done.
                self.commit(row, resume, {**info["daemon"], "step": info["step"]})
            elif row["state"] == "training":
                self.end_attempt(row, "failed", f"the training worker died (exit code {code})")
        self.spawn_failures += 1
        self.next_spawn = time.time() + min(60.0, 2.0 ** (self.spawn_failures - 1))

    def rel(self, path: str | Path) -> str:
        return Path(path).resolve().relative_to(self.home.root.resolve()).as_posix()

    # ------------------------------------------------------------------ scheduling

    def maybe_start_work(self) -> None:
        w = self.worker
        if w is None or w.state != "idle" or self.stopping:
            return
        if self.model_checkpoint() is None:
            w.state = "busy"
            w.send({"cmd": "init"})
            return
        if self.ledger.meta("paused") == "1":
            self.state = "paused"
            return
        row = self.ledger.training()
        if row is None:
            queued = self.ledger.queued()
            if not queued:
                self.state = "idle"
                self.job = None
                return
            self.disk = storage.disk_gate(self.home, self.d.min_free_gb)
            if self.disk["gate"] != "ok":
                if self.state != "waiting_disk":
                    self.log(f"disk gate: {self.disk['free_gb']} GB free < "
                             f"{self.d.min_free_gb} GB; not starting files")
                self.state = "waiting_disk"
                return
            row = queued[0]
            with self.ledger.tx() as db:
                self.ledger.update(db, row["id"], state="training",
                                   attempts=row["attempts"] + 1, started_at=time.time(),
                                   step_before=self.ledger.model_step(), error=None)
            row = self.ledger.file(row["id"])
        resume = self.resume_checkpoint(row)
        if resume is not None and (storage.checkpoint_state(resume).get("daemon") or {}).get(
                "complete"):
            # The worker finished this file before a kill; only the commit was missing.
            state = storage.checkpoint_state(resume)
            self.commit(row, resume, {**state["daemon"], "step": state["step"]})
            return
        start_from = resume or self.model_checkpoint()
        self.job = {"id": row["id"], "name": row["name"], "priority": row["priority"],
                    "attempt": row["attempts"], "file_step": 0, "file_steps": None,
                    "step": self.ledger.model_step(), "loss": None, "lr": None, "tokens": 0,
                    "tokens0": 0, "t0": time.time(), "started_at": time.time()}
        w.state = "busy"
        self.state = "training"
        w.send({"cmd": "train", "file_id": row["id"], "attempt": row["attempts"],
                "name": row["name"], "path": str(self.home.queue / row["fname"]),
                "start_from": str(start_from), "seed": self.file_seed(row),
                "problems_path": str(problems_path(self.home, row))})
        self.write_status(force=True)

    def file_seed(self, row: dict[str, Any]) -> int:
        """Data order of a file: from the config's seed and the file's content, not its id."""
        return self.cfg.data.seed + int(row["sha256"][:8], 16)

    # ------------------------------------------------------------------ outcomes

    def commit(self, row: dict[str, Any], checkpoint: Path, info: dict[str, Any]) -> None:
        storage.publish(self.home, checkpoint)
        step_after = int(info["step"])
        now = time.time()
        with self.ledger.tx() as db:
            fields = dict(state="completed", rows=info.get("rows"),
                          invalid_rows=info.get("invalid_rows"), steps=info["file_steps"],
                          tokens=info["tokens"], step_before=info["step_before"],
                          step_after=step_after, loss_start=info.get("loss_start"),
                          loss_end=info.get("loss_end"), checkpoint=self.rel(checkpoint),
                          trained_at=info.get("time", now), finished_at=now, error=None)
            self.ledger.update(db, row["id"], **fields)
            self.ledger.add_attempt(db, file_id=row["id"], attempt=row["attempts"],
                                    outcome="completed", step_before=info["step_before"],
                                    step_after=step_after, steps=info["file_steps"],
                                    tokens=info["tokens"], loss_start=info.get("loss_start"),
                                    loss_end=info.get("loss_end"), error=None,
                                    started_at=row["started_at"], finished_at=now)
            self.ledger.set_meta(db, "model_checkpoint", self.rel(checkpoint))
            self.ledger.set_meta(db, "model_step", step_after)
        place_file(self.home, self.ledger, row["id"])
        self.ledger.set_file(row["id"], finished_at=time.time())  # committed, reported, moved
        self.job = None
        self.state = "idle"
        self.log(f"#{row['id']} {row['name']} completed: {info['file_steps']} steps "
                 f"({info['step_before']} -> {step_after}), {info['tokens']} tokens, "
                 f"loss {fmt(info.get('loss_start'))} -> {fmt(info.get('loss_end'))}")
        self.housekeeping()

    def end_attempt(self, row: dict[str, Any], outcome: str, error: str, **extra: Any) -> None:
        """A failed or skipped attempt: roll the model back, requeue lower or finish the file."""
        now = time.time()
        final = outcome == "skipped" or row["attempts"] >= self.d.max_attempts
        with self.ledger.tx() as db:
            self.ledger.add_attempt(db, file_id=row["id"], attempt=row["attempts"],
                                    outcome=outcome, step_before=row["step_before"],
                                    step_after=row["step_before"], steps=0, tokens=0,
                                    error=error, started_at=row["started_at"], finished_at=now)
            if final:
                self.ledger.update(db, row["id"], state="failed" if outcome == "failed"
                                   else "skipped", error=error, finished_at=now, **extra)
            else:
                self.ledger.update(db, row["id"], state="queued", error=error,
                                   priority=row["priority"] - 1, seq=self.ledger.next_seq(db),
                                   **extra)
        self.drop_stale_checkpoints()
        place_file(self.home, self.ledger, row["id"])
        self.job = None
        self.state = "idle"
        then = (f"moved to {STATE_FOLDERS[outcome if final else 'queued']}/" if final
                else f"requeued at priority {priority_name(row['priority'] - 1)}")
        self.log(f"#{row['id']} {row['name']} attempt {row['attempts']} {outcome}: {error}; "
                 f"model rolled back to step {self.ledger.model_step()}; {then}")

    # ------------------------------------------------------------------ housekeeping

    def housekeeping(self) -> None:
        self.last_housekeeping = time.time()
        now = dt.datetime.now()
        if storage.snapshot_due(now, self.d.snapshot_time, self.ledger.meta("last_snapshot")):
            day = now.date().isoformat()
            if storage.take_snapshot(self.home, day) is not None:
                self.ledger.put_meta("last_snapshot", day)
                self.log(f"snapshot {day} taken")
        protected = {p for p in (self.model_checkpoint(),) if p is not None}
        current = self.ledger.training()
        if current is not None:
            resume = self.resume_checkpoint(current)
            if resume is not None:
                protected.add(resume)
        deleted = storage.apply_retention(self.home, self.d.keep_checkpoints,
                                          self.d.snapshot_max_age_h, self.d.max_total_gb,
                                          protected)
        for p in deleted:
            self.log(f"retention: deleted {self.rel(p) if p.is_relative_to(self.home.root) else p}")
        self.disk = storage.disk_gate(self.home, self.d.min_free_gb)
        self.managed_gb = round(storage.managed_bytes(self.home) / storage.GB, 3)

    # ------------------------------------------------------------------ status.json

    def write_status(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last_status < self.d.status_interval_s:
            return
        self.last_status = now
        write_json_atomic(self.home.status, build_status(self, now))


def fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def build_status(d: Daemon, now: float) -> dict[str, Any]:
    """The home's status.json (fields documented in the README's "Continuous training")."""
    from trainer_core.daemon.control import queue_summary

    ledger = d.ledger
    last = ledger.files("state IN ('completed','failed','skipped')",
                        order="finished_at DESC LIMIT 10")
    job = d.job
    current = None
    if job is not None:
        current = {k: job.get(k) for k in ("id", "name", "attempt", "file_step", "file_steps",
                                           "step", "loss", "lr", "tokens", "started_at")}
        current["priority"] = priority_name(job["priority"])
    model_ckpt = ledger.meta("model_checkpoint")
    done = ledger.files("state='completed'", order="finished_at DESC LIMIT 50")
    hour_ago = [r for r in done if r["finished_at"] and r["finished_at"] > now - 3600]
    return {
        "kind": "trainer-daemon",
        "state": d.state,
        "pid": os.getpid(),
        "home": str(d.home.root),
        "started_at": d.started_at,
        "updated_at": now,
        "paused": ledger.meta("paused") == "1",
        "worker": None if d.worker is None else {"pid": d.worker.proc.pid,
                                                 "state": d.worker.state},
        "model": {"step": ledger.model_step(), "checkpoint": model_ckpt,
                  "current": str(storage.current_model(d.home) or "") or None},
        "current": current,
        "queue": queue_summary(ledger),
        "last": [{"id": r["id"], "name": r["name"], "state": r["state"], "steps": r["steps"],
                  "tokens": r["tokens"], "loss_end": r["loss_end"], "error": r["error"],
                  "finished_at": r["finished_at"]} for r in last],
        "counts": ledger.counts(),
        "rates": {"tokens_per_s": round(d.rate_tokens_per_s, 1),
                  "files_last_hour": len(hour_ago)},
        "disk": {**(d.disk or storage.disk_gate(d.home, d.d.min_free_gb)),
                 "managed_gb": d.managed_gb,
                 "max_total_gb": d.d.max_total_gb},
    }

