"""The training recipe: ``trainer run`` from resolved config to a saved model, top to bottom.

We use our own loop rather than ``transformers.Trainer``: the loss must be normalised by the
trained tokens of the whole optimizer step (not a mean of micro-batch means), packed batches
carry per-example position ids, resume must restore the exact data position and learning-rate
schedule, a NaN must never reach a checkpoint, and the GPU path swaps in compiled and fused
pieces. Each of those fights the Trainer's defaults; a short loop states them plainly.

:func:`run_training` reads as its steps: profile and rows -> model directory and lock ->
tokenizer and cached preprocessing -> plan (``--dry-run`` stops here) -> model, optimizer and
schedule -> resume state -> listeners -> the loop -> final model -> end event. Everything that
only watches a run (console, status.json, metrics.jsonl, previews.jsonl, run.json, plugin
listeners) hears about it through :class:`~trainer_core.monitor.events.RunEvents`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from trainer_core.config import Resolved, TrainerConfig, to_dict
from trainer_core.files import write_json_atomic
from trainer_core.model.loading import model_directory, quiet_hf, weights_finite
from trainer_core.monitor.console import print_plan
from trainer_core.monitor.events import (
    CheckpointSaved,
    Evaluation,
    Preview,
    RunEnd,
    RunEvents,
    RunListener,
    RunStart,
    StepEnd,
)
from trainer_core.plugins.registry import build_profile
from trainer_core.train.distributed import distributed_session, main_first, share_from_main
from trainer_core.train.inputs import load_rows, prepare_examples
from trainer_core.train.rundir import CONFIG_FILE, locate_output, plan_summary, run_manifest
from trainer_core.train.signals import StopRequested
from trainer_core.train.step import TrainingSetup, prepare_training, token_budget, train_step


@attrs.define
class Run:
    """What the loop and its named steps share: the plan, the model, the data, the counters."""

    cfg: TrainerConfig
    profile: Any
    tokenizer: Any
    plan: Any  # trainer_core.data.batching.StepPlan
    setup: TrainingSetup
    train_examples: list[dict[str, Any]]
    val_examples: list[dict[str, Any]]
    prompts: list[dict[str, Any]]
    output_dir: Path
    events: RunEvents
    #: checkpointed counters: step, tokens_trained, tokens_seen, first_loss, history
    state: dict[str, Any]
    last_loss: float = float("nan")
    eval_loss: float | None = None
    preview_scores: dict[str, float] = attrs.Factory(dict)
    start_step: int = 0
    window_tokens: int = 0
    window_start: float = attrs.Factory(time.time)
    loop_start: float = attrs.Factory(time.time)
    tokens_per_s: float = 0.0
    eta_s: float = float("inf")
    #: several processes (torchrun): this rank's :class:`~trainer_core.train.distributed.Distributed`
    dist: Any = None


def run_training(resolved: Resolved, dry_run: bool = False, unlock: bool = False,
                 quiet: bool = False, stream: Any = None,
                 listeners: list[RunListener] | None = None) -> dict[str, Any]:
    """Run (or plan, with ``dry_run``) one training run; returns the summary dict.

    ``listeners`` are added after the built-in ones (console, status, metrics, previews,
    manifest) and any that plugins return from the ``run_listeners`` hook. Under torchrun
    (several processes) every rank calls this; only rank 0 has listeners and writes files.
    """
    with distributed_session(resolved.config, dry_run) as dist:
        return _run_training(resolved, dist, dry_run, unlock, quiet, stream, listeners)


def _run_training(resolved: Resolved, dist: Any, dry_run: bool, unlock: bool, quiet: bool,
                  stream: Any, listeners: list[RunListener] | None) -> dict[str, Any]:
    cfg = resolved.config
    started = time.time()
    profile = build_profile(cfg)
    train_rows, val_rows, skipped = load_rows(cfg)
    quiet_hf()
    model_dir = main_first(dist, lambda: model_directory(cfg))
    output_dir, resume_from, facts = share_from_main(
        dist, lambda: locate_output(cfg, model_dir, dry_run, unlock))

    from trainer_core.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or str(model_dir),
                               trust_remote_code=cfg.model.trust_remote_code)
    train_examples, val_examples, stats = main_first(
        dist, lambda: prepare_examples(cfg, profile, tokenizer, train_rows, val_rows))
    from trainer_core.data.batching import plan_steps

    hp = cfg.hyperparams
    plan = plan_steps(len(train_examples), hp.batch_size * hp.gradient_accumulation,
                      hp.num_epochs, hp.max_steps, cfg.data.seed, cfg.data.shuffle)
    summary = plan_summary(cfg, profile, model_dir, output_dir, plan, train_rows, val_rows,
                           skipped, stats)
    if dry_run:
        print_plan(cfg, summary, stream or sys.stderr)
        return summary

    setup = prepare_training(cfg, model_dir, plan.total_steps, facts, parallel=dist)
    main = dist is None or dist.is_main
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / CONFIG_FILE, to_dict(cfg))
    state = resume_state(resume_from, setup)
    from trainer_core.generate.previews import preview_prompts

    prompts = preview_prompts(val_rows or train_rows, profile, cfg.monitoring.num_preview_samples,
                              cfg.data.seed + 1)
    events = RunEvents(run_listeners(cfg, output_dir, quiet, stream) + list(listeners or [])
                       if main else [])
    run = Run(cfg, profile, tokenizer, plan, setup, train_examples, val_examples, prompts,
              output_dir, events, state, start_step=state["step"], dist=dist)
    summary.update(train_examples=len(train_examples), precision=setup.precision,
                   device_type=setup.device.type)
    if dist is not None:
        summary.update(world_size=dist.world, distributed=dist.strategy)
        dist.on_abort = lambda why: events.end(RunEnd(
            "failed", why, {**summary, **final_summary(run, "failed", started)}))
    events.start(RunStart(str(output_dir), plan.total_steps, state["step"],
                          resume_from is not None, started, summary, to_dict(cfg),
                          run_manifest(cfg, profile, summary)))
    try:
        final_state, reason = train_loop(run)
        final_state, reason = save_final_model(run, final_state, reason)
        summary.update(final_summary(run, final_state, started))
        events.end(RunEnd(final_state, reason, summary))
    finally:
        events.close()
    return summary


def train_loop(run: Run) -> tuple[str, str | None]:
    """Steps until the plan is done, a signal arrives or a step fails; returns (state, reason)."""
    run.loop_start = run.window_start = time.time()
    with StopRequested() as stop:
        for step in range(run.state["step"], run.plan.total_steps):
            batches, n_trained = step_batches(run, step)
            loss, grad_norm, lr = train_step(run.setup, batches, n_trained,
                                             run.cfg.hyperparams.max_grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                return "failed", (f"error: loss {loss}, gradient norm {grad_norm} at step "
                                  f"{step + 1}; stopping. The last good checkpoint is untouched "
                                  "and no final model is written.")
            done = step + 1
            # several processes: global token counts, and a signal any rank got stops all
            tokens, signal = (run.dist.step_consensus(batches, stop.signal) if run.dist
                              else (None, stop.signal))
            record = account_step(run, done, batches, n_trained, loss, lr, grad_norm, tokens)
            record = maybe_evaluate(run, done, record)
            record = maybe_preview(run, done, record)
            end_step(run, done, loss, lr, grad_norm, record)
            if want_checkpoint(run, done) or signal is not None:
                if not model_finite(run):
                    return "failed", (f"error: non-finite weights after step {done}; stopping "
                                      "without saving. The last good checkpoint is untouched.")
                save_checkpoint(run, done)
            if signal is not None:
                return "interrupted", (f"stopped by signal {signal} at step {done}; "
                                       "checkpoint saved. Continue with --resume.")
    return "completed", None


# --------------------------------------------------------------------------- the named steps


def run_listeners(cfg: TrainerConfig, output_dir: Path, quiet: bool, stream: Any
                  ) -> list[RunListener]:
    """The built-in listeners, the run manifest, then those plugins add (``run_listeners``)."""
    from trainer_core.monitor.listeners import (
        ConsoleListener,
        MetricsListener,
        PreviewsListener,
        StatusListener,
    )
    from trainer_core.plugins.registry import collect_run_listeners
    from trainer_core.train.rundir import METRICS_FILE, PREVIEWS_FILE, STATUS_FILE, ManifestListener

    metrics_dir = Path(cfg.output.logging_dir or output_dir)
    return [
        ConsoleListener(quiet, stream or sys.stderr),
        StatusListener(output_dir / STATUS_FILE, cfg.monitoring.status_interval_s),
        MetricsListener(metrics_dir / METRICS_FILE),
        PreviewsListener(output_dir / PREVIEWS_FILE),
        ManifestListener(output_dir),
        *collect_run_listeners(cfg, output_dir),
    ]


def resume_state(resume_from: Path | None, setup: TrainingSetup) -> dict[str, Any]:
    """Fresh counters, or the checkpoint's (weights, optimizer, schedule and RNG restored)."""
    if resume_from is None:
        return {"step": 0, "tokens_trained": 0, "tokens_seen": 0, "first_loss": None,
                "history": []}
    if setup.parallel is not None:
        return setup.parallel.load_checkpoint(resume_from, setup)
    from trainer_core.train.checkpoint import load_checkpoint

    return load_checkpoint(resume_from, setup.model, setup.optimizer, setup.scheduler,
                           setup.scaler)


def step_batches(run: Run, step: int) -> tuple[list[dict[str, Any]], int]:
    """The micro-batches of ``step`` (a pure function of seed and step) and their trained tokens."""
    from trainer_core.data.batching import count_trained, micro_batches

    examples = [run.train_examples[i] for i in run.plan.step_indices(step)]
    if run.dist is not None:  # this rank's token-balanced share of the global step
        return run.dist.step_share(examples, run.cfg, token_budget(run.cfg),
                                   run.tokenizer.pad_token_id, run.setup.speed.pad_to_multiple)
    batches = micro_batches(examples, run.cfg.data.packing, run.cfg.hyperparams.batch_size,
                            token_budget(run.cfg), run.tokenizer.pad_token_id,
                            run.setup.speed.pad_to_multiple)
    return batches, count_trained(batches)


def account_step(run: Run, done: int, batches: list[dict[str, Any]], n_trained: int,
                 loss: float, lr: float, grad_norm: float, tokens: int | None = None
                 ) -> dict[str, Any] | None:
    """Update counters and rates; on logging steps return the step's metrics record.

    ``tokens``: the step's processed tokens when ``batches`` are only part of it."""
    if tokens is None:
        tokens = sum(int(b["input_ids"].numel()) for b in batches)
    state = run.state
    state["step"] = done
    state["tokens_trained"] += n_trained
    state["tokens_seen"] += tokens
    if state["first_loss"] is None:
        state["first_loss"] = loss
    run.last_loss = loss
    run.window_tokens += tokens
    now = time.time()
    elapsed = now - run.window_start
    run.tokens_per_s = run.window_tokens / elapsed if elapsed > 0 else 0.0
    rate = (done - run.start_step) / max(now - run.loop_start, 1e-9)
    run.eta_s = (run.plan.total_steps - done) / rate if rate > 0 else float("inf")
    if done % run.cfg.environment.logging_steps and done != run.plan.total_steps:
        return None
    run.window_tokens, run.window_start = 0, time.time()
    return {"step": done, "epoch": round(run.plan.epoch_at(done), 4), "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": run.tokens_per_s,
            "tokens_trained": state["tokens_trained"], "time": now}


def maybe_evaluate(run: Run, done: int, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validation loss every ``eval_steps`` and at the end."""
    from trainer_core.train.evaluate import evaluate

    hp = run.cfg.hyperparams
    at_end = done == run.plan.total_steps
    if not run.val_examples or not ((hp.eval_steps and done % hp.eval_steps == 0) or at_end):
        return record
    s = run.setup
    if run.dist is not None:  # every rank scores a share
        run.eval_loss = run.dist.evaluate(run.val_examples, run.cfg, s,
                                          run.tokenizer.pad_token_id, token_budget(run.cfg))
    else:
        run.eval_loss = evaluate(s.model, run.val_examples, run.cfg, s.device, s.precision,
                                 run.tokenizer.pad_token_id, s.speed)
    run.events.evaluation(Evaluation(done, run.eval_loss))
    return {**(record or {"step": done}), "eval_loss": run.eval_loss}


def maybe_preview(run: Run, done: int, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Generate and score the preview prompts every ``preview_steps`` and at the end."""
    from trainer_core.generate.previews import run_previews

    mon = run.cfg.monitoring
    at_end = done == run.plan.total_steps
    if not mon.num_preview_samples or not ((mon.preview_steps and done % mon.preview_steps == 0)
                                           or at_end):
        return record
    # Several processes: rank 0 generates with its full DDP replica while the others wait at
    # the next collective; FSDP holds no full copy anywhere, so there are no previews.
    if run.dist is not None and (not run.dist.is_main or run.dist.strategy == "fsdp"):
        return record
    records, run.preview_scores = run_previews(run.setup.model, run.tokenizer, run.profile,
                                               run.prompts, run.cfg, done)
    run.events.preview(Preview(done, records, run.preview_scores))
    return {**(record or {"step": done}), **run.preview_scores}


def end_step(run: Run, done: int, loss: float, lr: float, grad_norm: float,
             record: dict[str, Any] | None) -> None:
    """Keep the step's record in the (checkpointed) history and tell the listeners."""
    if record is not None:
        run.state["history"].append(record)
    run.events.step_end(StepEnd(done, run.plan.total_steps, loss, lr, grad_norm,
                                run.tokens_per_s, run.eta_s, run.plan.epoch_at(done),
                                run.state["tokens_trained"], record))


def want_checkpoint(run: Run, done: int) -> bool:
    save_steps = run.cfg.hyperparams.save_steps
    return bool(save_steps and done % save_steps == 0 and done != run.plan.total_steps)


def save_checkpoint(run: Run, done: int) -> None:
    from trainer_core.train.checkpoint import save_checkpoint as save

    s = run.setup
    if run.dist is not None:  # rank 0 writes; FSDP gathers the full state first
        path = run.dist.save_checkpoint(run.output_dir, done, s, run.state,
                                        run.cfg.hyperparams.save_total_limit)
    else:
        path = save(run.output_dir, done, s.model, s.optimizer, s.scheduler, s.scaler,
                    run.state, run.cfg.hyperparams.save_total_limit)
    run.events.checkpoint(CheckpointSaved(done, str(path)))


def save_final_model(run: Run, final_state: str, reason: str | None) -> tuple[str, str | None]:
    """Write the model and tokenizer of a completed run, unless its weights are not finite."""
    if final_state != "completed":
        return final_state, reason
    if not model_finite(run):
        return "failed", "error: non-finite weights at the end of training; no model written."
    # several processes: rank 0 writes (FSDP: the full state, gathered by every rank)
    state_dict = run.dist.full_model_state() if run.dist is not None else None
    if run.dist is None or run.dist.is_main:
        run.setup.model.save_pretrained(run.output_dir, safe_serialization=True,
                                        state_dict=state_dict)
        run.tokenizer.save_pretrained(run.output_dir)
    if run.dist is not None:
        run.dist.barrier()
    return final_state, reason


def model_finite(run: Run) -> bool:
    """Finite weights (several processes: all ranks agree)."""
    return run.dist.weights_finite() if run.dist is not None else weights_finite(run.setup.model)


def final_summary(run: Run, final_state: str, started: float) -> dict[str, Any]:
    train_time = time.time() - run.loop_start
    state = run.state
    return {
        "state": final_state,
        "steps_done": state["step"],
        "tokens_trained": state["tokens_trained"],
        "tokens_seen": state["tokens_seen"],
        "loss_start": state["first_loss"],
        "loss_end": run.last_loss,
        "eval_loss": run.eval_loss,
        "preview_scores": run.preview_scores,
        "wall_time_s": round(time.time() - started, 2),
        "train_time_s": round(train_time, 2),
        "tokens_per_s": round(state["tokens_seen"] / train_time, 1) if train_time > 0 else None,
        "precision": run.setup.precision,
        "device": str(run.setup.device),
    }

