"""The training worker: a child process of the daemon that trains one file at a time.

It loads torch, the tokenizer and the model once and keeps them (and the optimizer) in memory
across files, so consecutive files pay neither a model load nor a compilation: a file that
starts from the checkpoint this worker just wrote starts at once; only a rollback or a restart
reloads a checkpoint from disk. Training is the engine's: ``prepare_training`` + ``train_step``
over ``micro_batches`` of a ``plan_steps`` plan, with checkpoints by ``save_checkpoint`` and
``load_checkpoint``, so resuming a killed file continues it exactly.

Protocol: JSON lines. The daemon writes commands on stdin (``init``, ``train``, ``pause``,
``stop``, ``skip``); the worker answers on its own copy of stdout (``hello``, ``ready``,
``progress``, ``checkpoint``, ``done``, ``failed``, ``paused``, ``stopped``, ``skipped``,
``fatal``). Everything else the process prints goes to stderr (the daemon's logs/worker.log).
Closed stdin means the daemon is gone: the worker exits.

``TRAINER_DAEMON_FAULT`` (tests only) injects faults, comma-separated: ``nan:SUBSTR`` turns the
weights to NaN during the second step of files whose name contains SUBSTR, ``crash:SUBSTR``
kills the worker there, ``crashdone:SUBSTR`` kills it right after the file's final checkpoint,
``sleep:SECONDS`` slows every step down.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trainer_core.daemon.home import Home
from trainer_core.errors import UserError


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
        self.out = out
        self.inbox: queue.Queue = queue.Queue()
        self.faults = parse_faults(os.environ.get("TRAINER_DAEMON_FAULT", ""))
        self.setup: Any = None  # TrainingSetup once loaded
        self.at: str | None = None  # checkpoint path whose state is in memory, None if dirty
        threading.Thread(target=self._read_stdin, daemon=True).start()

    # ------------------------------------------------------------------ protocol

    def _read_stdin(self) -> None:
        for line in sys.stdin:
            line = line.strip()
            if line:
                self.inbox.put(json.loads(line))
        self.inbox.put(None)

    def send(self, event: str, **fields: Any) -> None:
        self.out.write(json.dumps({"event": event, **fields}, default=str) + "\n")
        self.out.flush()

    def next_command(self, block: bool) -> dict[str, Any] | None:
        try:
            msg = self.inbox.get(block=block)
        except queue.Empty:
            return None
        if msg is None:
            raise Stop
        return msg

    # ------------------------------------------------------------------ setup

    def load(self) -> None:
        """Config, profile, tokenizer, model, optimizer and schedule (once per process)."""
        from trainer_core.config import resolve
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
        from trainer_core.train.step import prepare_training

        self.cfg = cfg = resolve(file=self.home.config).config
        quiet_hf()
        self.profile = build_profile(cfg)
        model_dir = model_directory(cfg)
        check_model_against_config(cfg, model_facts(model_dir))
        base = cfg.locked.base_model or (cfg.model.path or "trainer/tiny-qwen3-demo")
        facts = expected_facts(cfg, model_dir, base)
        check_and_write_lock(self.home.root, facts)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or str(model_dir),
                                        trust_remote_code=cfg.model.trust_remote_code)
        if not self.home.tokenizer.is_dir():
            tmp = self.home.root / ".tokenizer.tmp"
            self.tokenizer.save_pretrained(tmp)
            os.replace(tmp, self.home.tokenizer)
        hp, d = cfg.hyperparams, cfg.daemon
        self.schedule = DaemonSchedule(hp.warmup_steps or 0, d.lr_schedule, hp.lr_scheduler)
        self.setup = prepare_training(cfg, model_dir, 0, facts, schedule=self.schedule)
        self.state: dict[str, Any] = {"step": 0, "tokens_trained": 0, "tokens_seen": 0,
                                      "first_loss": None, "history": []}
        self.at = None

    def restore(self, checkpoint: str) -> None:
        """Bring the in-memory state to ``checkpoint`` unless it is already there."""
        if self.at == checkpoint:
            return
        from trainer_core.train.checkpoint import load_checkpoint

        s = self.setup
        self.state = load_checkpoint(Path(checkpoint), s.model, s.optimizer, s.scheduler,
                                     s.scaler)
        self.at = checkpoint

    def save(self, daemon_fields: dict[str, Any]) -> str:
        from trainer_core.train.checkpoint import save_checkpoint

        s = self.setup
        # In memory as on disk: a resume that needs no reload still knows the data position.
        self.state["daemon"] = daemon_fields
        path = save_checkpoint(self.home.root, self.state["step"], s.model, s.optimizer,
                               s.scheduler, s.scaler, self.state, keep=None)
        self.at = str(path)
        return str(path)

    # ------------------------------------------------------------------ commands

    def init(self) -> None:
        """The daemon's first checkpoint (step 0): the base model and a fresh optimizer."""
        self.save({"file_id": None, "attempt": 0, "file_step": 0, "file_steps": 0,
                   "complete": True})
        self.send("ready", checkpoint=self.at, step=0)

    def train(self, job: dict[str, Any]) -> bool:
        """Train one file; returns False when the worker must exit (stop)."""
        from trainer_core.data.batching import (
            count_tokens,
            count_trained,
            micro_batches,
            plan_steps,
        )
        from trainer_core.data.rows import check_rows, read_rows
        from trainer_core.errors import DataError
        from trainer_core.model.loading import weights_finite
        from trainer_core.train.inputs import preprocess_rows
        from trainer_core.train.step import token_budget, train_step

        cfg, s = self.cfg, self.setup
        fid, attempt, path = job["file_id"], job["attempt"], job["path"]
        self.restore(job["start_from"])
        resumed = self.state.get("daemon") or {}
        mine = resumed.get("file_id") == fid and resumed.get("attempt") == attempt
        if not mine:
            resumed = {}
        # Validation: all rows, the same rules as `trainer run`.
        rows, problems = read_rows(path)
        if problems:
            Path(job["problems_path"]).write_text(json.dumps(
                [{"line": p.line, "field": p.field, "reason": p.reason, "detail": p.detail}
                 for p in problems], indent=1), encoding="utf-8")
        try:
            check_rows(problems, cfg.data.on_invalid, job["name"])
            if not rows:
                raise DataError(f"{job['name']}: no valid rows")
            ds, _ = preprocess_rows(rows, cfg, self.profile, self.tokenizer, job["name"])
        except UserError as exc:
            self.send("failed", file_id=fid, error=str(exc), rows=len(rows),
                      invalid_rows=len({p.line for p in problems}))
            return True
        examples = ds.examples()  # built per step from the (memory-mapped) arrays
        if not examples:
            self.send("failed", file_id=fid, error="no examples left after preprocessing",
                      rows=len(rows), invalid_rows=len({p.line for p in problems}))
            return True
        hp, d = cfg.hyperparams, cfg.daemon
        plan = plan_steps(len(examples), hp.batch_size * hp.gradient_accumulation,
                          d.epochs_per_file, None, job["seed"], cfg.data.shuffle)
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

        self.send("started", file_id=fid, file_step=file_step, file_steps=plan.total_steps,
                  step=self.state["step"], resumed=mine, time=time.time())
        while file_step < plan.total_steps:
            msg = self.next_command(block=False)
            if msg is not None:
                cmd = msg["cmd"]
                if cmd == "skip":
                    self.at = None  # rolled back on the next file: reload
                    self.send("skipped", file_id=fid)
                    return True
                if cmd in ("pause", "stop"):
                    if not weights_finite(s.model):
                        self.at = None
                        self.send("failed", file_id=fid, error="non-finite weights")
                        return cmd != "stop"
                    # Nothing trained since the last checkpoint: point at it rather than
                    # rewrite it (rewriting the committed model's checkpoint opens a window
                    # where a kill would lose it).
                    ckpt = self.at if self.at is not None else self.save(fields(False))
                    self.send("paused" if cmd == "pause" else "stopped", file_id=fid,
                              checkpoint=ckpt, step=self.state["step"], file_step=file_step)
                    return cmd != "stop"
            self.fault_hooks(job["name"], file_step)
            batch_examples = [examples[i] for i in plan.step_indices(file_step)]
            batches = micro_batches(batch_examples, cfg.data.packing, hp.batch_size,
                                    token_budget(cfg), self.tokenizer.pad_token_id,
                                    s.speed.pad_to_multiple)
            n_trained = count_trained(batches)
            self.at = None
            loss, grad_norm, lr = train_step(s, batches, n_trained, hp.max_grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self.send("failed", file_id=fid, error=(
                    f"loss {loss}, gradient norm {grad_norm} at file step {file_step + 1} "
                    f"(global step {self.state['step'] + 1}); model rolled back"))
                return True
            file_step += 1
            seen = count_tokens(batches)
            self.state["step"] += 1
            self.state["tokens_trained"] += n_trained
            self.state["tokens_seen"] += seen
            if self.state["first_loss"] is None:
                self.state["first_loss"] = loss
            tokens += n_trained
            loss_start = loss if loss_start is None else loss_start
            loss_end = loss
            self.send("progress", file_id=fid, file_step=file_step,
                      file_steps=plan.total_steps, step=self.state["step"], loss=loss, lr=lr,
                      grad_norm=grad_norm, tokens=tokens, time=time.time())
            if (d.save_steps and file_step % d.save_steps == 0
                    and file_step < plan.total_steps):
                if not weights_finite(s.model):
                    self.at = None
                    self.send("failed", file_id=fid, error=f"non-finite weights at file step "
                              f"{file_step}; model rolled back")
                    return True
                self.send("checkpoint", file_id=fid, checkpoint=self.save(fields(False)),
                          step=self.state["step"], file_step=file_step)
        if not weights_finite(s.model):
            self.at = None
            self.send("failed", file_id=fid, error="non-finite weights at the end of the file; "
                      "model rolled back")
            return True
        ckpt = self.save(fields(True))
        if self.faults.get("crashdone") and self.faults["crashdone"] in job["name"]:
            os._exit(18)
        self.send("done", checkpoint=ckpt, **fields(True), step=self.state["step"],
                  time=time.time())
        return True

    def fault_hooks(self, name: str, file_step: int) -> None:
        if "sleep" in self.faults:
            time.sleep(float(self.faults["sleep"]))
        if file_step == 1 and self.faults.get("crash") and self.faults["crash"] in name:
            os._exit(17)
        if file_step == 1 and self.faults.get("nan") and self.faults["nan"] in name:
            import torch

            with torch.no_grad():
                for p in self.setup.model.parameters():
                    p.fill_(float("nan"))

    def serve(self) -> None:
        self.send("hello", pid=os.getpid())
        try:
            self.load()
            self.send("loaded", step=self.state["step"])
            while True:
                msg = self.next_command(block=True)
                if msg is None:
                    continue
                cmd = msg["cmd"]
                if cmd == "init":
                    self.init()
                elif cmd == "train":
                    if not self.train(msg):
                        return
                elif cmd == "stop":
                    self.send("stopped", file_id=None)
                    return
                # pause/skip with nothing in training: nothing to do
        except Stop:
            return
        except UserError as exc:
            self.send("fatal", error=str(exc))
            sys.exit(2)


def parse_faults(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition(":")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    import signal

    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    # Ctrl-C in a terminal signals the whole process group: the daemon alone decides, and
    # tells the worker to checkpoint and stop at a step boundary.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The protocol owns the real stdout; anything else printed goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    Worker(Home(argv[0]), proto).serve()


if __name__ == "__main__":
    main()
