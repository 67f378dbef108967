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

import contextlib
import datetime as dt
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TextIO

import attrs

from trainer_core.config import TrainerConfig, to_dict
from trainer_core.daemon import protocol, storage
from trainer_core.daemon.home import PRIORITY_LEVELS, STATE_FOLDERS, Home, HomeLock, priority_name
from trainer_core.daemon.intake import (
    LINK_COPY_PREFIX,
    InboxWatcher,
    finish_incoming,
    take_from_inbox,
)
from trainer_core.daemon.ledger import Ledger, is_disk_full
from trainer_core.daemon.reports import problems_path, report_path, write_report
from trainer_core.errors import UserError
from trainer_core.files import append_jsonl, write_json_atomic

TICK_S = 0.1
HOUSEKEEPING_S = 30.0
#: After a full disk: work goes on once this much space was freed, or after DISK_RETRY_S.
DISK_FREED_BYTES = 64 << 20
DISK_RETRY_S = 60.0


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
    if key.isascii() and key.isdigit() and int(key) < 2**63:  # SQLite's INTEGER range
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


def skip_interrupted(home: Home, ledger: Ledger, row: dict[str, Any]) -> dict[str, Any]:
    """Skip the file a stopped daemon was training (no daemon runs: nothing to interrupt).
    Its checkpoints are past the committed model and owned by no attempt now, so the next
    start drops them, as after any rollback."""
    now = time.time()
    with ledger.tx() as db:
        ledger.add_attempt(db, file_id=row["id"], attempt=row["attempts"], outcome="skipped",
                           step_before=row["step_before"], step_after=row["step_before"],
                           steps=0, tokens=0, error="skipped by the user",
                           started_at=row["started_at"], finished_at=now)
        ledger.update(db, row["id"], state="skipped", error="skipped by the user",
                      finished_at=now)
    place_file(home, ledger, row["id"])
    return ledger.file(row["id"])


# --------------------------------------------------------------------------- start checks

#: Settings a restart may change only when accepted (``--allow-changes KIND``): each shapes
#: the model the daemon continues, and a checkpoint carries its old value. Their kinds are
#: those of ``trainer run --resume``.
RESTART_KINDS = {
    "hyperparams.learning_rate": "lr", "hyperparams.weight_decay": "lr",
    "hyperparams.max_grad_norm": "lr", "hyperparams.lr_scheduler": "schedule",
    "hyperparams.warmup_steps": "schedule", "daemon.lr_schedule": "schedule",
    "hyperparams.batch_size": "batch", "hyperparams.gradient_accumulation": "batch",
    "data.packing": "batch", "hyperparams.max_length": "data", "data.truncation": "data",
    "data.special_tokens_in_content": "data", "data.seed": "seed", "data.shuffle": "seed",
    "profile.name": "profile", "profile.options": "profile",
    "model.tokenizer": "tokenizer", "model.chat_template": "template",
}
#: What ties a home to its model for life (its checkpoints, tokenizer and model lock).
MODEL_KEYS = ("model.path", "locked.base_model", "locked.model_architecture",
              "locked.vocab_size", "locked.max_context_length", "locked.model_version")


def _dotted(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _model_of(tree: dict[str, Any]) -> Any:
    path = _dotted(tree, "model.path")
    return str(Path(path).expanduser().absolute()) if path else None


def check_start(home: Home, cfg: TrainerConfig, ledger: Ledger | None) -> list[str]:
    """Refuse a start that would silently change what the home trains (before anything is
    saved); returns the accepted changes (``old -> new``) to announce.

    Another model: always refused (a home trains one model for its life). A setting of
    :data:`RESTART_KINDS` changed since the home's config: refused listing ``old -> new``
    unless its kind is in ``output.allow_changes`` (``--allow-changes``); then the new value
    is the one used (the worker puts the config's learning rate and weight decay over a
    restored optimizer's). Nothing to compare while the home has no model checkpoint yet.
    """
    if ledger is None or ledger.meta("model_checkpoint") is None or not home.config.is_file():
        return []
    try:
        old = json.loads(home.config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    new = to_dict(cfg)
    models = [(k, _dotted(old, k), _dotted(new, k)) for k in MODEL_KEYS[1:]
              if _dotted(old, k) != _dotted(new, k)]
    if _model_of(old) != _model_of(new):
        models.insert(0, ("model.path", _model_of(old), _model_of(new)))
    if models:
        listed = "; ".join(f"{k}: {a} -> {b}" for k, a, b in models)
        raise UserError(f"{home.root} trains another model ({listed}); a home trains one model "
                        "for its life: start the daemon without --model (the home's own), or "
                        "give the new model another --home")
    allowed = set(cfg.output.allow_changes or ())
    diffs = [(k, kind, _dotted(old, k), _dotted(new, k)) for k, kind in RESTART_KINDS.items()
             if _dotted(old, k) != _dotted(new, k)]
    refused = [d for d in diffs if d[1] not in allowed]
    if refused:
        kinds = ",".join(sorted({d[1] for d in refused}))
        listed = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, _, a, b in refused)
        raise UserError(f"{home.root}: the daemon's settings changed since its last start "
                        f"({listed}); its checkpoints carry the old ones. Start without "
                        f"them, accept them with --allow-changes {kinds} (the new values "
                        "are then used from the next step), or use another --home")
    return [f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, _, a, b in diffs]


def check_ledger_matches_home(home: Home, ledger: Ledger) -> None:
    """Refuse a ledger that is missing, emptied or older than the home's checkpoints and
    published models (a disk restored from an old backup): starting would publish an older
    model as the current one, delete the newer checkpoints and train completed files again."""
    model_step = ledger.model_step() if ledger.meta("model_checkpoint") is not None else -1
    legit: set[int] = set()
    unknown: list[Path] = []
    for path in storage.checkpoints(home):
        step = storage.step_of(path)
        if step <= max(model_step, 0):
            continue
        try:
            fid = (storage.checkpoint_state(path).get("daemon") or {}).get("file_id")
        except (OSError, ValueError):
            continue  # unreadable: not evidence either way
        if isinstance(fid, int) and fid < 2**63 and ledger.files("id=?", (fid,)):
            legit.add(step)
        else:
            unknown.append(path)
    if home.models.is_dir():
        unknown += [p for p in home.models.iterdir() if p.name.startswith("step-")
                    and p.name[5:].isdigit() and storage.step_of(p) > max(model_step, 0)
                    and storage.step_of(p) not in legit]
    if not unknown:
        return
    newest = max(storage.step_of(p) for p in unknown)
    what = ("missing or empty" if not ledger.counts() and model_step < 0
            else f"at model step {max(model_step, 0)}")
    raise UserError(
        f"{home.ledger} is {what}, but the home holds the model of step {newest} "
        f"({', '.join(p.relative_to(home.root).as_posix() for p in unknown[:3])}): the ledger "
        "is missing, emptied or older than the home (restored from a backup?). Starting would "
        "publish an older model, delete newer checkpoints and train completed files again. "
        f"Restore ledger.sqlite from a backup as new as step {newest}, or start over: move "
        "ledger.sqlite, checkpoints/, models/ and current aside (the files in completed/ can "
        "be submitted again)")


def usable_checkpoint(path: Path) -> bool:
    """All of a checkpoint's files are there and not empty (the worker reads them fully)."""
    return all((path / n).is_file() and (path / n).stat().st_size > 0
               for n in (storage.STATE_FILE, "training_state.pt", "model.safetensors"))


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
            msg = protocol.decode_event(line.decode("utf-8", "replace"))
            if msg is not None:
                self.events.put(msg)
        self.events.put(protocol.Exit(self.proc.wait()))

    def send(self, msg: Any) -> None:
        """A command (:mod:`trainer_core.daemon.protocol`) on the worker's stdin."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(protocol.encode(msg).encode())
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

    def __init__(self, home: Home, cfg: TrainerConfig, stream: TextIO | None = None,
                 output: Any = None):
        self.home = home
        self.output = output  # called once the start is accepted (detached: redirects output)
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
        self.disk_full_at: tuple[float, int] | None = None  # (when, free bytes) of a full disk
        self.cannot_take: dict[Path, str] = {}  # inbox files that could not be taken, and why

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        if not self.lock.acquire():
            from trainer_core.daemon.home import daemon_running

            raise UserError(f"{self.home.root}: a daemon is already running here "
                            f"(pid {daemon_running(self.home)}); one daemon per home")
        try:
            if not self.home.ledger.exists():  # refused without creating one
                with contextlib.closing(Ledger(Path(":memory:"))) as empty:
                    check_ledger_matches_home(self.home, empty)
            self.home.create()
            self.ledger = Ledger(self.home.ledger)
            try:
                check_ledger_matches_home(self.home, self.ledger)
                accepted = check_start(self.home, self.cfg, self.ledger)
            except BaseException:
                self.ledger.close()
                raise
            if self.output is not None:  # --detach: from now on the home's log is the output
                self.output()
            write_json_atomic(self.home.config, to_dict(self.cfg))
            self.watcher = InboxWatcher(self.home, self.d.settle_s)
            old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
            self.log(f"daemon started in {self.home.root} (pid {os.getpid()})")
            self.log(in_force(self.cfg, accepted))
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
            self.worker.send(protocol.StopCommand())

    def log(self, msg: str) -> None:
        line = f"{dt.datetime.now().isoformat(timespec='seconds')} {msg}"
        try:
            with open(self.home.logs / "daemon.log", "a", encoding="utf-8",
                      errors="backslashreplace") as fh:
                fh.write(line + "\n")
        except OSError:  # a full disk: the line still reaches the terminal
            pass
        if self.stream is not None:
            print(line.encode("utf-8", "backslashreplace").decode("utf-8"), file=self.stream,
                  flush=True)

    def loop(self) -> None:
        while True:
            try:
                if self.tick():
                    return
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                self.wait_for_disk(str(exc).splitlines()[0] if str(exc) else repr(exc))

    def wait_for_disk(self, why: str) -> None:
        """The disk is full (a ledger write, a move, status.json): a daemon-level wait, never
        a file's failure. Whatever was interrupted is finished on a later tick, as after a
        restart (ledger transactions roll back whole)."""
        if self.state != "waiting_disk":
            self.log(f"disk full ({why}); waiting for free space")
        self.state = "waiting_disk"
        self.disk_full_at = (time.time(), storage.free_bytes(self.home))
        with contextlib.suppress(Exception):
            self.write_status(force=True)
        time.sleep(min(5.0, DISK_RETRY_S))

    def disk_waiting(self) -> bool:
        """After a full disk: wait until space was freed (or a while passed) before the next
        file or attempt."""
        if self.disk_full_at is None:
            return False
        t, free = self.disk_full_at
        if storage.free_bytes(self.home) > free + DISK_FREED_BYTES or time.time() - t > \
                DISK_RETRY_S:
            self.disk_full_at = None
            self.log("disk space freed; going on")
            return False
        self.state = "waiting_disk"
        return True

    def tick(self) -> bool:
        """One turn of the loop; True when the daemon is done."""
        self.handle_commands()
        now = time.time()
        if not self.stopping and now - self.last_scan >= self.d.poll_interval_s:
            self.last_scan = now
            self.scan_inbox()
        self.pump_worker(TICK_S)
        if self.stopping and (self.worker is None or self.worker.state in ("down", "exited")):
            return True
        if not self.stopping:
            self.ensure_worker()
            self.maybe_start_work()
            if time.time() - self.last_housekeeping >= HOUSEKEEPING_S:
                self.housekeeping()
        self.write_status()
        return False

    # ------------------------------------------------------------------ startup

    def reconcile(self) -> None:
        """Finish whatever a kill interrupted: intake, moves, reports, publishing, rollbacks."""
        home, ledger = self.home, self.ledger
        for row in ledger.files("state='incoming'"):
            try:
                finish_incoming(home, ledger, row)
            except UserError as exc:  # a full disk: left incoming, tried at the next start
                self.log(f"#{row['id']} {row['name']}: {exc}")
        sources = {r["source"] for r in ledger.files("state='incoming'")}
        for tmp in home.queue.glob(f"{LINK_COPY_PREFIX}*.tmp"):  # a kill during a link's copy
            if str(tmp) not in sources:
                tmp.unlink(missing_ok=True)
        for row in ledger.files("state NOT IN ('incoming')"):
            place_file(home, ledger, row["id"], rewrite=False)
        storage.remove_incomplete(home)
        model_ckpt = self.model_checkpoint()
        if model_ckpt is not None and not usable_checkpoint(model_ckpt):
            model_ckpt = self.fall_back(model_ckpt)
        if model_ckpt is not None:
            storage.publish(home, model_ckpt)
        self.drop_stale_checkpoints()

    def fall_back(self, missing: Path) -> Path:
        """The current model's checkpoint is gone or incomplete (deleted by hand): go back to
        the newest complete earlier one that ends a file (or the base model) and queue again
        the files trained since, so the model and the ledger agree. No such checkpoint: refuse
        with the way out."""
        ledger = self.ledger
        earlier = []
        for p in storage.checkpoints(self.home):
            if storage.step_of(p) >= storage.step_of(missing) or not usable_checkpoint(p):
                continue
            try:
                if (storage.checkpoint_state(p).get("daemon") or {}).get("complete"):
                    earlier.append(p)
            except (OSError, ValueError):
                continue
        if not earlier:
            raise UserError(f"{missing}: the current model's checkpoint is missing or "
                            "incomplete and no earlier complete checkpoint remains; restore it "
                            "from a backup, or start over: move ledger.sqlite, checkpoints/, "
                            "models/ and current aside")
        back = earlier[-1]
        step = storage.step_of(back)
        redo = ledger.files("(state='completed' AND step_after > ?) OR state='training'",
                            (step,))
        why = (f"requeued: checkpoint {missing.name} was missing; the model fell back to "
               f"{back.name}")
        with ledger.tx() as db:
            for r in redo:
                ledger.update(db, r["id"], state="queued", seq=ledger.next_seq(db), error=why,
                              finished_at=None)
            ledger.set_meta(db, "model_checkpoint", self.rel(back))
            ledger.set_meta(db, "model_step", step)
        for r in redo:
            place_file(self.home, ledger, r["id"])
        self.log(f"checkpoint {missing.relative_to(self.home.root)} is missing or incomplete; "
                 f"the model falls back to {back.name} (step {step}); "
                 f"{len(redo)} file(s) trained since are queued again")
        return back

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
            shown = os.fsencode(path).decode("utf-8", "backslashreplace")
            try:
                row = take_from_inbox(self.home, self.ledger, path, self.d.default_priority,
                                      int(self.d.max_row_mb * (1 << 20)))
            except (OSError, UserError) as exc:
                if self.cannot_take.get(path) != str(exc):  # said once, not every scan
                    self.cannot_take[path] = str(exc)
                    self.log(f"cannot take {shown}: {exc}")
                continue
            self.cannot_take.pop(path, None)
            self.watcher.forget(path)
            if row is None:
                self.log(f"{shown}: its name is not valid UTF-8; renamed (taken at the next scan)")
                continue
            what = ("queued" if row["state"] == "queued" else
                    f"{row['state']}: {row['error']}")
            self.log(f"#{row['id']} {row['name']} ({priority_name(row['priority'])}) {what}")

    def handle_commands(self) -> None:
        for c in self.ledger.pending_commands():
            try:
                result = self.command(c["cmd"], c["arg"])
            except UserError as exc:
                result = f"error: {exc}"
            except Exception as exc:  # never replayed forever: it is answered, as failed
                result = f"error: cannot apply {c['cmd']}: {type(exc).__name__}: {exc}"
            self.ledger.finish_command(c["id"], result)
            self.log(f"command {c['cmd']}{' ' + c['arg'] if c['arg'] else ''}: {result}")
            self.write_status(force=True)

    def command(self, cmd: str, arg: str | None) -> str:
        ledger = self.ledger
        if cmd == "pause":
            ledger.put_meta("paused", 1)
            if self.job is not None and self.worker is not None and self.worker.state == "busy":
                self.worker.send(protocol.PauseCommand())
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
                self.worker.send(protocol.SkipCommand())
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

    # ------------------------------------------------------------------ the worker's events

    def on_event(self, msg: Any) -> None:
        """One message from the worker (:mod:`trainer_core.daemon.protocol`), by
        :data:`EVENT_HANDLERS`; ``hello`` needs nothing."""
        handler = self.EVENT_HANDLERS.get(type(msg))
        if handler is not None:
            handler(self, msg)

    def handle(self) -> WorkerHandle:
        """The worker whose message is being handled."""
        assert self.worker is not None
        return self.worker

    def on_loaded(self, msg: protocol.Loaded) -> None:
        self.handle().state = "idle"
        self.spawn_failures = 0

    def on_ready(self, msg: protocol.Ready) -> None:
        """``init``'s answer: the base model is checkpoint step 0."""
        with self.ledger.tx() as db:
            self.ledger.set_meta(db, "model_checkpoint", self.rel(msg.checkpoint))
            self.ledger.set_meta(db, "model_step", 0)
        storage.publish(self.home, Path(msg.checkpoint))
        self.handle().state = "idle"
        self.log("base model checkpointed as step 0 and published")

    def on_started(self, msg: protocol.Started) -> None:
        if self.job is None:
            return
        self.job.update(file_step=msg.file_step, file_steps=msg.file_steps, step=msg.step)
        self.ledger.set_file(msg.file_id, train_started_at=msg.time)
        how = f"resumed at file step {msg.file_step}" if msg.resumed else "started"
        self.log(f"#{self.job['id']} {self.job['name']} {how} "
                 f"({msg.file_steps} steps, global step {msg.step})")

    def on_progress(self, msg: protocol.Progress) -> None:
        if self.job is None:
            return
        append_jsonl(self.home.metrics,
                     {"time": msg.time, "step": msg.step, "file_id": msg.file_id,
                      "file_step": msg.file_step, "loss": msg.loss, "lr": msg.lr,
                      "grad_norm": msg.grad_norm, "tokens": msg.tokens})
        elapsed = time.time() - self.job["t0"]
        self.job.update(file_step=msg.file_step, file_steps=msg.file_steps, step=msg.step,
                        loss=msg.loss, lr=msg.lr, tokens=msg.tokens)
        if elapsed > 0:
            self.rate_tokens_per_s = (msg.tokens - self.job["tokens0"]) / elapsed

    def on_checkpoint(self, msg: protocol.Checkpoint) -> None:
        if self.job is not None:
            self.job["checkpoint"] = msg.checkpoint

    def on_done(self, msg: protocol.Done) -> None:
        self.handle().state = "idle"
        self.commit(self.ledger.file(msg.file_id), Path(msg.checkpoint), attrs.asdict(msg))

    def on_failed(self, msg: protocol.Failed) -> None:
        # exiting: a rank died under torchrun; no new work until the exit is seen
        self.handle().state = "exiting" if msg.exiting else "idle"
        row = self.ledger.file(msg.file_id)
        extra = {k: v for k, v in (("rows", msg.rows), ("invalid_rows", msg.invalid_rows))
                 if v is not None}
        if msg.disk_full:  # not the file's failure: back in line, not counted
            self.disk_full_attempt(row, msg.error)
        else:  # data_error: the file's own data; another attempt would fail the same way
            self.end_attempt(row, "failed", msg.error, final=msg.data_error, **extra)

    def on_skipped(self, msg: protocol.Skipped) -> None:
        self.handle().state = "idle"
        self.end_attempt(self.ledger.file(msg.file_id), "skipped", "skipped by the user")

    def on_paused(self, msg: protocol.Paused) -> None:
        self.handle().state = "idle"
        if self.job is not None:
            self.job["checkpoint"] = msg.checkpoint
        self.log(f"paused at global step {msg.step} (checkpoint saved)")

    def on_stopped(self, msg: protocol.Stopped) -> None:
        self.handle().state = "exited"
        if msg.checkpoint:
            self.log(f"worker stopped at global step {msg.step} (checkpoint saved)")

    def on_fatal(self, msg: protocol.Fatal) -> None:
        self.log(f"error: {msg.error}")
        self.exit_code = 2
        self.request_stop("fatal worker error")
        self.handle().state = "exited"

    def on_log(self, msg: protocol.Log) -> None:
        self.log(msg.message)

    def on_exit(self, msg: protocol.Exit) -> None:
        self.on_worker_exit(msg.code)

    #: Each message the worker sends -> what the daemon does with it.
    EVENT_HANDLERS: ClassVar[dict[type, Callable[[Any, Any], None]]] = {
        protocol.Loaded: on_loaded, protocol.Ready: on_ready, protocol.Started: on_started,
        protocol.Progress: on_progress, protocol.Checkpoint: on_checkpoint,
        protocol.Done: on_done, protocol.Failed: on_failed, protocol.Skipped: on_skipped,
        protocol.Paused: on_paused, protocol.Stopped: on_stopped, protocol.Fatal: on_fatal,
        protocol.Log: on_log, protocol.Exit: on_exit,
    }

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
            w.send(protocol.InitCommand())
            return
        if self.ledger.meta("paused") == "1":
            self.state = "paused"
            return
        if self.disk_waiting():
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
        if not (self.home.queue / row["fname"]).is_file():
            self.end_attempt(row, "failed", "the file is gone from queue/ (deleted or moved "
                             "after it was taken in)", final=True)
            return
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
        w.send(protocol.TrainCommand(
            file_id=row["id"], attempt=row["attempts"], name=row["name"],
            path=str(self.home.queue / row["fname"]), start_from=str(start_from),
            seed=self.file_seed(row), problems_path=str(problems_path(self.home, row))))
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

    def disk_full_attempt(self, row: dict[str, Any], error: str) -> None:
        """The disk filled up during a file (its checkpoint could not be written): roll back
        as after a failure, but put the file back first in line with the attempt not counted,
        and wait for space (``waiting_disk``)."""
        with self.ledger.tx() as db:
            self.ledger.update(db, row["id"], state="queued", attempts=row["attempts"] - 1,
                               error=f"waiting for disk space: {error}")
        self.drop_stale_checkpoints()
        place_file(self.home, self.ledger, row["id"])
        self.job = None
        self.disk_full_at = (time.time(), storage.free_bytes(self.home))
        self.state = "waiting_disk"
        self.log(f"#{row['id']} {row['name']}: disk full ({error}); model rolled back to step "
                 f"{self.ledger.model_step()}; the file waits, first in line, for free space")

    def end_attempt(self, row: dict[str, Any], outcome: str, error: str, final: bool = False,
                    **extra: Any) -> None:
        """A failed or skipped attempt: roll the model back, requeue lower or finish the file
        (``final``: a problem another attempt cannot change, such as invalid data)."""
        now = time.time()
        final = final or outcome == "skipped" or row["attempts"] >= self.d.max_attempts
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


def in_force(cfg: TrainerConfig, accepted: list[str]) -> str:
    """The start's log line saying what trains (and which changed settings were accepted)."""
    hp = cfg.hyperparams
    line = (f"in force: model {cfg.model.path or 'the embedded demo model'}, learning rate "
            f"{hp.learning_rate:g}, weight decay {hp.weight_decay:g}, batch {hp.batch_size} x "
            f"{hp.gradient_accumulation}, warmup {hp.warmup_steps or 0} steps, schedule "
            f"{cfg.daemon.lr_schedule}, max_length {hp.max_length}")
    return line + (f"; accepted changes: {'; '.join(accepted)}" if accepted else "")


def fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def build_status(d: Daemon, now: float) -> dict[str, Any]:
    """The home's status.json (fields documented in the README's "Continuous training")."""
    ledger = d.ledger
    queued = ledger.queued()
    by_priority: dict[str, int] = {"high": 0, "normal": 0, "low": 0, "retry": 0}
    for r in queued:
        by_priority[priority_name(r["priority"])] += 1
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
        "queue": {"total": len(queued), "by_priority": by_priority,
                  "next": [{"id": r["id"], "name": r["name"],
                            "priority": priority_name(r["priority"]), "attempts": r["attempts"]}
                           for r in queued[:10]]},
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

