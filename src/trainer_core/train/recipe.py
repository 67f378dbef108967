"""The training recipe: ``trainer run`` from resolved config to a saved model, top to bottom.

We use our own loop rather than ``transformers.Trainer``: the loss must be normalised by the
trained tokens of the whole optimizer step (not a mean of micro-batch means), packed batches
carry per-example position ids, resume must restore the exact data position and learning-rate
schedule, a NaN must never reach a checkpoint, and the GPU path swaps in compiled and fused
pieces. Each of those fights the Trainer's defaults; a short loop states them plainly.

:func:`run_training` reads as its steps: profile and rows -> model directory and lock ->
tokenizer and cached preprocessing -> plan (``--dry-run`` stops here) -> listeners -> model,
optimizer and schedule -> resume state -> the loop -> final model -> end event. Everything
that only watches a run (console, status.json, metrics.jsonl, previews.jsonl, run.json,
loss.svg, alerts, trackers and other plugin listeners) hears about it through :class:`~trainer_core.monitor.events.RunEvents`.
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
from trainer_core.monitor.alerts import non_finite_alert
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
from trainer_core.plugins.registry import build_profile, check_report_to
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


def run_training(resolved: Resolved, dry_run: bool = False, unlock: bool = False,
                 quiet: bool = False, stream: Any = None,
                 listeners: list[RunListener] | None = None) -> dict[str, Any]:
    """Run (or plan, with ``dry_run``) one training run; returns the summary dict.

    ``listeners`` are added after the built-in ones (console, status, metrics, previews,
    manifest) and any that plugins return from the ``run_listeners`` hook.
    """
    cfg = resolved.config
    started = time.time()
    profile = build_profile(cfg)
    check_report_to(cfg)
    train_rows, val_rows, skipped = load_rows(cfg)
    quiet_hf()
    model_dir = model_directory(cfg)
    output_dir, resume_from, facts = locate_output(cfg, model_dir, dry_run, unlock)

    from trainer_core.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or str(model_dir),
                               trust_remote_code=cfg.model.trust_remote_code)
    train_examples, val_examples, stats = prepare_examples(cfg, profile, tokenizer, train_rows,
                                                           val_rows)
    from trainer_core.data.batching import plan_steps

    hp = cfg.hyperparams
    plan = plan_steps(len(train_examples), hp.batch_size * hp.gradient_accumulation,
                      hp.num_epochs, hp.max_steps, cfg.data.seed, cfg.data.shuffle)
    summary = plan_summary(cfg, profile, model_dir, output_dir, plan, train_rows, val_rows,
                           skipped, stats)
    if dry_run:
        print_plan(cfg, summary, stream or sys.stderr)
        return summary

    # Listeners are built before the model loads: a tracker whose package is missing fails now.
    events = RunEvents(run_listeners(cfg, output_dir, quiet, stream) + list(listeners or []))
    setup = prepare_training(cfg, model_dir, plan.total_steps, facts)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / CONFIG_FILE, to_dict(cfg))
    state = resume_state(resume_from, setup)
    from trainer_core.generate.previews import preview_prompts

    prompts = preview_prompts(val_rows or train_rows, profile, cfg.monitoring.num_preview_samples,
                              cfg.data.seed + 1)
    run = Run(cfg, profile, tokenizer, plan, setup, train_examples, val_examples, prompts,
              output_dir, events, state, start_step=state["step"])
    summary.update(train_examples=len(train_examples), precision=setup.precision,
                   device_type=setup.device.type)
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
                run.events.alert(non_finite_alert(step + 1, loss, grad_norm))
                return "failed", (f"error: loss {loss}, gradient norm {grad_norm} at step "
                                  f"{step + 1}; stopping. The last good checkpoint is untouched "
                                  "and no final model is written.")
            done = step + 1
            record = account_step(run, done, batches, n_trained, loss, lr, grad_norm)
            record = maybe_evaluate(run, done, record)
            record = maybe_preview(run, done, record)
            end_step(run, done, loss, lr, grad_norm, record)
            if want_checkpoint(run, done) or stop.signal is not None:
                if not weights_finite(run.setup.model):
                    return "failed", (f"error: non-finite weights after step {done}; stopping "
                                      "without saving. The last good checkpoint is untouched.")
                save_checkpoint(run, done)
            if stop.signal is not None:
                return "interrupted", (f"stopped by signal {stop.signal} at step {done}; "
                                       "checkpoint saved. Continue with --resume.")
    return "completed", None


# --------------------------------------------------------------------------- the named steps


def run_listeners(cfg: TrainerConfig, output_dir: Path, quiet: bool, stream: Any
                  ) -> list[RunListener]:
    """The built-in listeners, the run manifest, then those plugins add (``run_listeners``)."""
    from trainer_core.monitor.alerts import AlertsListener
    from trainer_core.monitor.listeners import (
        ConsoleListener,
        MetricsListener,
        PreviewsListener,
        StatusListener,
    )
    from trainer_core.monitor.plot import PLOT_FILE, PlotListener
    from trainer_core.plugins.registry import collect_run_listeners
    from trainer_core.train.rundir import METRICS_FILE, PREVIEWS_FILE, STATUS_FILE, ManifestListener

    metrics_dir = Path(cfg.output.logging_dir or output_dir)
    mon = cfg.monitoring
    return [
        ConsoleListener(quiet, stream or sys.stderr),
        StatusListener(output_dir / STATUS_FILE, mon.status_interval_s, mon.stall_after_s),
        MetricsListener(metrics_dir / METRICS_FILE),
        PreviewsListener(output_dir / PREVIEWS_FILE),
        ManifestListener(output_dir),
        PlotListener(output_dir / PLOT_FILE, metrics_dir / METRICS_FILE),
        *([AlertsListener(mon)] if mon.alerts else []),
        *collect_run_listeners(cfg, output_dir),
    ]


def resume_state(resume_from: Path | None, setup: TrainingSetup) -> dict[str, Any]:
    """Fresh counters, or the checkpoint's (weights, optimizer, schedule and RNG restored)."""
    if resume_from is None:
        return {"step": 0, "tokens_trained": 0, "tokens_seen": 0, "first_loss": None,
                "history": []}
    from trainer_core.train.checkpoint import load_checkpoint

    return load_checkpoint(resume_from, setup.model, setup.optimizer, setup.scheduler,
                           setup.scaler)


def step_batches(run: Run, step: int) -> tuple[list[dict[str, Any]], int]:
    """The micro-batches of ``step`` (a pure function of seed and step) and their trained tokens."""
    from trainer_core.data.batching import count_trained, micro_batches

    examples = [run.train_examples[i] for i in run.plan.step_indices(step)]
    batches = micro_batches(examples, run.cfg.data.packing, run.cfg.hyperparams.batch_size,
                            token_budget(run.cfg), run.tokenizer.pad_token_id,
                            run.setup.speed.pad_to_multiple)
    return batches, count_trained(batches)


def account_step(run: Run, done: int, batches: list[dict[str, Any]], n_trained: int,
                 loss: float, lr: float, grad_norm: float) -> dict[str, Any] | None:
    """Update counters and rates; on logging steps return the step's metrics record."""
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
    path = save(run.output_dir, done, s.model, s.optimizer, s.scheduler, s.scaler, run.state,
                run.cfg.hyperparams.save_total_limit)
    run.events.checkpoint(CheckpointSaved(done, str(path)))


def save_final_model(run: Run, final_state: str, reason: str | None) -> tuple[str, str | None]:
    """Write the model and tokenizer of a completed run, unless its weights are not finite."""
    if final_state != "completed":
        return final_state, reason
    if not weights_finite(run.setup.model):
        return "failed", "error: non-finite weights at the end of training; no model written."
    run.setup.model.save_pretrained(run.output_dir, safe_serialization=True)
    run.tokenizer.save_pretrained(run.output_dir)
    return final_state, reason


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

