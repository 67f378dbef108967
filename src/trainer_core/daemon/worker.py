"""The training worker: a child process of the daemon that trains one file at a time.

It loads torch, the tokenizer and the model once and keeps them (and the optimizer) in memory
across files, so consecutive files pay neither a model load nor a compilation: a file that
starts from the checkpoint this worker just wrote starts at once; only a rollback or a restart
reloads a checkpoint from disk. Training is the step engine's (:mod:`trainer_core.train.engine`):
``prepare_training`` + ``train_step`` over ``micro_batches`` of a ``plan_steps`` plan, with
checkpoints by ``engine.save`` and ``engine.load``, so resuming a killed file continues it
exactly.

Protocol: JSON lines, typed in :mod:`trainer_core.daemon.protocol`. The daemon writes commands
on stdin (``init``, ``train``, ``pause``, ``stop``, ``skip``); the worker answers on its own copy
of stdout (``hello``, ``loaded``, ``ready``, ``started``, ``progress``, ``checkpoint``, ``done``,
``failed``, ``paused``, ``stopped``, ``skipped``, ``fatal``, ``log``). Everything else the process prints goes to stderr (the daemon's logs/worker.log).
Closed stdin means the daemon is gone: the worker exits.

Under torchrun (``daemon.nproc`` > 1) every rank runs this worker; rank 0 alone reads the
daemon's commands, answers on the protocol and writes files (checkpoints through
:class:`~trainer_core.train.distributed.Distributed`, which gathers what FSDP shards). The
other ranks' stdout goes to stderr and they never read stdin. Rank 0's command (and a SIGTERM
any rank got, taken as ``stop``) reaches every rank in a small collective at each step
boundary, so all ranks take the same step, pause, skip or checkpoint; while idle, rank 0
broadcasts the next command (or nothing) every :data:`IDLE_SYNC_S`. A rank that dies ends the
others through the distributed watchdog; rank 0 then reports the file ``failed`` with the
reason, and the daemon sees the worker exit.

``TRAINER_DAEMON_FAULT`` (tests only) injects faults, comma-separated: ``nan:SUBSTR`` turns the
weights to NaN during the second step of files whose name contains SUBSTR, ``crash:SUBSTR``
kills the worker there, ``rankcrash:SUBSTR`` kills only its last rank there (under torchrun;
the only process otherwise), ``crashdone:SUBSTR`` kills it right after the file's final
checkpoint, ``sleep:SECONDS`` slows every step down.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trainer_core.daemon import protocol
from trainer_core.daemon.home import Home
from trainer_core.errors import UserError
from trainer_core.train.distributed import launched_by_torchrun

#: Under torchrun, seconds an idle rank 0 waits for a command before telling the others
#: "nothing yet" (keeps every collective far below the process group's timeout).
IDLE_SYNC_S = 0.5
#: Commands that can arrive during a step, as numbers for one all-reduce (4: stdin closed).
STEP_COMMANDS = {"pause": 1, "skip": 2, "stop": 3}
EOF_CODE = 4


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the daemon dies, so a worker never outlives its supervisor."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: closed stdin still stops the worker at the next step
        pass


class Stop(Exception):
    """The daemon went away (stdin closed) or asked to stop."""


class Worker:
    def __init__(self, home: Home, out: Any):
        self.home = home
        self.out = out  # the protocol (rank 0 only; None on the other ranks)
        self.distributed = launched_by_torchrun()
        self.rank = int(os.environ.get("RANK", "0")) if self.distributed else 0
        self.is_main = self.rank == 0
        self.inbox: queue.Queue = queue.Queue()
        self.faults = parse_faults(os.environ.get("TRAINER_DAEMON_FAULT", ""))
        self.setup: Any = None  # TrainingSetup once loaded
        self.at: str | None = None  # checkpoint path whose state is in memory, None if dirty
        self.dist: Any = None  # this rank's Distributed under torchrun
        self.signal: int | None = None  # SIGTERM under torchrun: stop like the daemon's stop
        self.file_id: int | None = None  # the file in training (a failure names it)
        self.send_lock = threading.Lock()  # the watchdog thread may report a failure
        if self.is_main:
            threading.Thread(target=self._read_stdin, daemon=True).start()

    # ------------------------------------------------------------------ protocol

    def _read_stdin(self) -> None:
        for line in sys.stdin:
            msg = protocol.decode_command(line)
            if msg is not None:
                self.inbox.put(msg)
        self.inbox.put(None)

    def send(self, msg: Any) -> None:
        """An event (:mod:`trainer_core.daemon.protocol`) to the daemon (rank 0 only)."""
        if not self.is_main:
            return
        line = protocol.encode(msg)
        with self.send_lock:
            self.out.write(line)
            self.out.flush()

    def next_command(self, block: bool) -> Any:
        try:
            msg = self.inbox.get(block=block)
        except queue.Empty:
            return None
        if msg is None:
            raise Stop
        return msg

    def wait_command(self) -> Any:
        """The daemon's next command, blocking (every rank gets rank 0's)."""
        if self.dist is None:
            while True:
                msg = self.next_command(block=True)
                if msg is not None:
                    return msg

        def take() -> Any:
            try:
                return self.inbox.get(timeout=IDLE_SYNC_S)
            except queue.Empty:
                return {}  # nothing yet (None: stdin closed)

        while True:
            msg = self.dist.share(take)
            if msg is None:
                raise Stop
            if self.dist.all_sum([1.0 if self.signal else 0.0])[0]:
                return protocol.StopCommand()
            if msg:
                return msg

    def step_command(self) -> str | None:
        """A command at a step boundary, without waiting: ``pause``, ``skip``, ``stop`` or None.
        Under torchrun one all-reduce gives every rank rank 0's command, and turns a SIGTERM
        that any rank got into ``stop``."""
        code, eof = 0, False
        if self.is_main:
            try:
                msg = self.next_command(block=False)
            except Stop:
                eof = True
            else:
                code = STEP_COMMANDS.get(msg.NAME if msg is not None else "", 0)
        if self.dist is None:
            if eof:
                raise Stop
        else:
            total, signals = self.dist.all_sum([float(EOF_CODE if eof else code),
                                                1.0 if self.signal else 0.0])
            if int(total) == EOF_CODE:
                raise Stop
            code = int(total) or (STEP_COMMANDS["stop"] if signals else 0)
        return next((c for c, n in STEP_COMMANDS.items() if n == code), None)

    def on_abort(self, why: str) -> None:
        """Another rank died or failed (the watchdog, just before this process ends)."""
        reason = why.removeprefix("error: ").removesuffix("; stopping")
        self.report_exit(f"a training process failed under torchrun: {reason}")

    def report_exit(self, error: str) -> None:
        """This worker is going away: the file in training (if any) failed with ``error``.
        Said once, whichever thread sees the failure first."""
        with self.send_lock:
            fid, self.file_id = self.file_id, None
        if fid is not None:
            self.send(protocol.Failed(file_id=fid, exiting=True, error=error))
        else:
            self.send(protocol.Log(error))

    # ------------------------------------------------------------------ several processes

    def first(self, fn: Any) -> Any:
        """``fn()`` on every rank, rank 0 first (it fills a cache the others then read); its
        ``UserError`` is raised on every rank alike (the same input fails the same way)."""
        if self.dist is None:
            return fn()

        def attempt() -> tuple[Any, UserError | None]:
            try:
                return fn(), None
            except UserError as exc:
                return None, exc

        value, exc = self.dist.main_first(attempt)
        if exc is not None:
            raise exc
        return value

    def finite(self) -> bool:
        return self.setup.engine.finite()  # (several processes: all ranks agree)

    # ------------------------------------------------------------------ setup

    def load(self, cfg: Any) -> None:
        """Profile, tokenizer, model, optimizer and schedule (once per process)."""
        from trainer_core.config.lock import (
            check_and_write_lock,
            check_model_against_config,
            expected_facts,
            model_facts,
        )
        from trainer_core.daemon.schedule import DaemonSchedule
        from trainer_core.data.tokenizer import load_tokenizer
        from trainer_core.model.loading import model_directory, quiet_hf
        from trainer_core.plugins.registry import build_profile
        from trainer_core.train.distributed import main_first, share_from_main
        from trainer_core.train.step import prepare_training

        self.cfg = cfg
        dist = self.dist
        quiet_hf()
        self.profile = build_profile(cfg)
        model_dir = main_first(dist, lambda: model_directory(cfg))
        self.model_dir = model_dir
        check_model_against_config(cfg, model_facts(model_dir))
        base = cfg.locked.base_model or (cfg.model.path or "trainer/tiny-qwen3-demo")
        facts = expected_facts(cfg, model_dir, base)
        share_from_main(dist, lambda: check_and_write_lock(self.home.root, facts))

        def tokenizer() -> Any:
            tok = load_tokenizer(cfg.model.tokenizer or str(model_dir),
                                 trust_remote_code=cfg.model.trust_remote_code)
            if self.is_main and not self.home.tokenizer.is_dir():
                tmp = self.home.root / ".tokenizer.tmp"
                tok.save_pretrained(tmp)
                os.replace(tmp, self.home.tokenizer)
            return tok

        self.tokenizer = main_first(dist, tokenizer)
        hp, d = cfg.hyperparams, cfg.daemon
        per_step = hp.batch_size * hp.gradient_accumulation
        if dist is not None and per_step < dist.world:
            raise UserError(f"hyperparams: {per_step} examples per optimizer step cannot be "
                            f"split over {dist.world} processes (daemon.nproc); raise "
                            "batch_size x gradient_accumulation to at least daemon.nproc")
        self.schedule = DaemonSchedule(hp.warmup_steps or 0, d.lr_schedule, hp.lr_scheduler)
        self.setup = prepare_training(cfg, model_dir, 0, facts, schedule=self.schedule,
                                      parallel=dist)
        self.state: dict[str, Any] = {"step": 0, "tokens_trained": 0, "tokens_seen": 0,
                                      "first_loss": None, "history": []}
        self.at = None

    def restore(self, checkpoint: str) -> None:
        """Bring the in-memory state to ``checkpoint`` unless it is already there."""
        if self.at == checkpoint:
            return
        from trainer_core.train.checkpoint import read_checkpoint

        # (several processes: every rank reads it; FSDP takes its shards)
        self.at = None  # until fully restored
        self.state = self.setup.engine.load(read_checkpoint(Path(checkpoint)))
        from trainer_core.daemon.schedule import apply_config_optimizer

        s = self.setup
        apply_config_optimizer(self.cfg, s.scheduler, s.optimizer)  # the config's, not the
        self.at = checkpoint  # checkpoint's (a restart may have changed them, accepted)

    def save(self, daemon_fields: dict[str, Any]) -> str:
        # In memory as on disk: a resume that needs no reload still knows the data position.
        self.state["daemon"] = daemon_fields
        # An adapter's checkpoint holds only the adapter; the ones the daemon publishes (the
        # base at step 0, each finished file) also hold the merged model.
        merged = self.model_dir if daemon_fields.get("complete") else None
        # (several processes: rank 0 writes, FSDP gathers first; all return together)
        path = self.setup.engine.save(self.home.root, self.state["step"], self.state, keep=None,
                                      merged_from=merged)
        self.at = str(path)
        return str(path)

    # ------------------------------------------------------------------ commands

    def init(self) -> None:
        """The daemon's first checkpoint (step 0): the base model and a fresh optimizer."""
        checkpoint = self.save({"file_id": None, "attempt": 0, "file_step": 0, "file_steps": 0,
                                "complete": True})
        self.send(protocol.Ready(checkpoint=checkpoint, step=0))

    def train(self, job: protocol.TrainCommand) -> bool:
        """Train one file; returns False when the worker must exit (stop)."""
        from trainer_core.data.batching import (
            count_tokens,
            count_trained,
            micro_batches,
            plan_steps,
        )
        from trainer_core.data.rows import RowFormat, check_rows, read_rows
        from trainer_core.errors import DataError
        from trainer_core.train.inputs import preprocess_rows, token_budget
        from trainer_core.train.step import train_step

        cfg, s = self.cfg, self.setup
        fid, attempt, path = job.file_id, job.attempt, job.path
        self.restore(job.start_from)
        resumed = self.state.get("daemon") or {}
        mine = resumed.get("file_id") == fid and resumed.get("attempt") == attempt
        if not mine:
            resumed = {}
        # Validation: all rows, the same rules as `trainer run`.
        rows, problems = read_rows(path, RowFormat.from_config(cfg.data))
        if problems and self.is_main:
            Path(job.problems_path).write_text(json.dumps(
                [{"line": p.line, "field": p.field, "reason": p.reason, "detail": p.detail}
                 for p in problems], indent=1), encoding="utf-8")
        try:
            check_rows(problems, cfg.data.on_invalid, job.name)
            if not rows:
                raise DataError(f"{job.name}: no valid rows")
            ds, _ = self.first(lambda: preprocess_rows(rows, cfg, self.profile, self.tokenizer,
                                                       job.name))
        except UserError as exc:
            self.send(protocol.Failed(file_id=fid, error=str(exc), rows=len(rows),
                                      invalid_rows=len({p.line for p in problems}),
                                      data_error=True))
            return True
        examples = ds.examples()  # built per step from the (memory-mapped) arrays
        if not examples:
            self.send(protocol.Failed(file_id=fid, error="no examples left after preprocessing",
                                      rows=len(rows), invalid_rows=len({p.line for p in problems}),
                                      data_error=True))
            return True
        hp, d = cfg.hyperparams, cfg.daemon
        plan = plan_steps(len(examples), hp.batch_size * hp.gradient_accumulation,
                          d.epochs_per_file, None, job.seed, cfg.data.shuffle)
        file_step = int(resumed.get("file_step", 0))
        step_before = int(resumed.get("step_before", self.state["step"]))
        tokens = int(resumed.get("tokens", 0))
        loss_start = resumed.get("loss_start")
        loss_end = resumed.get("loss_end")
        self.schedule.begin_file(step_before, plan.total_steps)
        from trainer_core.daemon.schedule import apply_lr

        apply_lr(s.scheduler, s.optimizer)
        invalid = len({p.line for p in problems})

        def fields(complete: bool) -> dict[str, Any]:
            return {"file_id": fid, "attempt": attempt, "file_step": file_step,
                    "file_steps": plan.total_steps, "step_before": step_before,
                    "tokens": tokens, "loss_start": loss_start, "loss_end": loss_end,
                    "rows": len(rows), "invalid_rows": invalid, "complete": complete}

        self.send(protocol.Started(file_id=fid, file_step=file_step, file_steps=plan.total_steps,
                                   step=self.state["step"], resumed=mine, time=time.time()))
        while file_step < plan.total_steps:
            cmd = self.step_command()
            if cmd is not None:
                if cmd == "skip":
                    self.at = None  # rolled back on the next file: reload
                    self.send(protocol.Skipped(file_id=fid))
                    return True
                if cmd in ("pause", "stop"):
                    if not self.finite():
                        self.at = None
                        self.send(protocol.Failed(file_id=fid, error="non-finite weights"))
                        return cmd != "stop"
                    # Nothing trained since the last checkpoint: point at it rather than
                    # rewrite it (rewriting the committed model's checkpoint opens a window
                    # where a kill would lose it).
                    ckpt = self.at if self.at is not None else self.save(fields(False))
                    answer = protocol.Paused if cmd == "pause" else protocol.Stopped
                    self.send(answer(file_id=fid, checkpoint=ckpt, step=self.state["step"],
                                     file_step=file_step))
                    return cmd != "stop"
            self.fault_hooks(job.name, file_step)
            batch_examples = [examples[i] for i in plan.step_indices(file_step)]
            if self.dist is not None:  # this rank's token-balanced share of the step
                batches, n_trained = self.dist.step_share(
                    batch_examples, cfg, token_budget(cfg), self.tokenizer.pad_token_id,
                    s.speed.pad_to_multiple)
            else:
                batches = micro_batches(batch_examples, cfg.data.packing, hp.batch_size,
                                        token_budget(cfg), self.tokenizer.pad_token_id,
                                        s.speed.pad_to_multiple)
                n_trained = count_trained(batches)
            self.at = None
            loss, grad_norm, lr = train_step(s, batches, n_trained, hp.max_grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self.send(protocol.Failed(file_id=fid, error=(
                    f"loss {loss}, gradient norm {grad_norm} at file step {file_step + 1} "
                    f"(global step {self.state['step'] + 1}); model rolled back")))
                return True
            file_step += 1
            seen = (self.dist.step_consensus(batches, None)[0] if self.dist is not None
                    else count_tokens(batches))
            self.state["step"] += 1
            self.state["tokens_trained"] += n_trained
            self.state["tokens_seen"] += seen
            if self.state["first_loss"] is None:
                self.state["first_loss"] = loss
            tokens += n_trained
            loss_start = loss if loss_start is None else loss_start
            loss_end = loss
            self.send(protocol.Progress(
                file_id=fid, file_step=file_step, file_steps=plan.total_steps,
                step=self.state["step"], loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens,
                time=time.time()))
            if (d.save_steps and file_step % d.save_steps == 0
                    and file_step < plan.total_steps):
                if not self.finite():
                    self.at = None
                    self.send(protocol.Failed(file_id=fid, error=f"non-finite weights at file "
                                              f"step {file_step}; model rolled back"))
                    return True
                self.send(protocol.Checkpoint(file_id=fid, checkpoint=self.save(fields(False)),
                                              step=self.state["step"], file_step=file_step))
        if not self.finite():
            self.at = None
            self.send(protocol.Failed(file_id=fid, error="non-finite weights at the end of the "
                                      "file; model rolled back"))
            return True
        ckpt = self.save(fields(True))
        if self.faults.get("crashdone") and self.faults["crashdone"] in job.name:
            os._exit(18)
        self.send(protocol.Done(checkpoint=ckpt, **fields(True), step=self.state["step"],
                                time=time.time()))
        return True

    def fault_hooks(self, name: str, file_step: int) -> None:
        if "sleep" in self.faults:
            time.sleep(float(self.faults["sleep"]))
        if file_step == 1 and self.faults.get("crash") and self.faults["crash"] in name:
            os._exit(17)
        world = self.dist.world if self.dist is not None else 1
        if (file_step == 1 and self.rank == world - 1 and self.faults.get("rankcrash")
                and self.faults["rankcrash"] in name):
            os._exit(19)
        if file_step == 1 and self.faults.get("nan") and self.faults["nan"] in name:
            import torch

            with torch.no_grad():
                for p in self.setup.model.parameters():
                    p.fill_(float("nan"))

    def serve(self) -> None:
        from trainer_core.config import resolve
        from trainer_core.train.distributed import distributed_session

        self.send(protocol.Hello(pid=os.getpid()))
        try:
            cfg = resolve(file=self.home.config).config
            with distributed_session(cfg) as dist:
                self.dist = dist
                if dist is not None:
                    dist.on_abort = self.on_abort
                self.load(cfg)
                self.send(protocol.Loaded(step=self.state["step"]))
                with contextlib.suppress(Stop):  # the daemon is gone: leave together
                    self.commands()
        except UserError as exc:
            self.send(protocol.Fatal(error=str(exc)))
            sys.exit(2)

    def commands(self) -> None:
        while True:
            msg = self.wait_command()
            if isinstance(msg, protocol.InitCommand):
                self.init()
            elif isinstance(msg, protocol.TrainCommand):
                self.file_id = msg.file_id
                try:
                    if not self.train(msg):
                        return
                except Stop:
                    raise
                except UserError as exc:  # about this file (unreadable, gone): it fails alone
                    self.at = None
                    self.send(protocol.Failed(file_id=msg.file_id, error=str(exc)))
                except Exception as exc:
                    from trainer_core.daemon.ledger import is_disk_full

                    if is_disk_full(exc):  # a checkpoint on a full disk: the daemon waits
                        self.at = None
                        self.send(protocol.Failed(file_id=msg.file_id, disk_full=True,
                                                  error=str(exc).splitlines()[0][:300]))
                        continue
                    # Under torchrun a peer's death often surfaces here first (gloo: connection
                    # reset); name the peer when the evidence is there.
                    why = self.dist.peer_failure() if self.dist is not None else None
                    self.report_exit(f"a training process failed under torchrun: {why}" if why
                                     else f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
                    raise
                finally:
                    self.file_id = None
            elif isinstance(msg, protocol.StopCommand):
                self.send(protocol.Stopped(file_id=None))
                return
            # pause/skip with nothing in training: nothing to do


def parse_faults(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition(":")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    import signal

    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()  # under torchrun: when torchrun dies (it dies with the daemon)
    # Ctrl-C in a terminal signals the whole process group: the daemon alone decides, and
    # tells the worker to checkpoint and stop at a step boundary.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The protocol owns the real stdout (rank 0's under torchrun); anything else printed, and
    # everything the other ranks print, goes to stderr.
    main_rank = not launched_by_torchrun() or os.environ.get("RANK") == "0"
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8") if main_rank else None
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = Worker(Home(argv[0]), proto)
    if worker.distributed:
        # torchrun forwards SIGTERM (someone stopped the job, or it is tearing it down):
        # checkpoint and stop at the next step boundary, as on the daemon's `stop`.
        def on_term(signum: int, _frame: Any) -> None:
            worker.signal = signum

        signal.signal(signal.SIGTERM, on_term)
    worker.serve()


if __name__ == "__main__":
    main()
