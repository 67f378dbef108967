"""The training recipe: ``trainer run`` from resolved config to a saved model, top to bottom.

We use our own loop rather than ``transformers.Trainer``: the loss must be normalised by the
trained tokens of the whole optimizer step (not a mean of micro-batch means), packed batches
carry per-example position ids, resume must restore the exact data position and learning-rate
schedule, a NaN must never reach a checkpoint, and the GPU path swaps in compiled and fused
pieces. Each of those fights the Trainer's defaults; a short loop states them plainly.

:func:`run_training` reads as its steps: profile and rows -> model directory and lock ->
tokenizer and cached preprocessing -> plan (``--dry-run`` stops here) -> listeners -> model,
optimizer and schedule -> resume state -> the loop (:mod:`trainer_core.train.loop`, shared
with the daemon) -> final model -> end event. Everything
that only watches a run (console, status.json, metrics.jsonl, previews.jsonl, run.json,
loss.svg, alerts, trackers and other plugin listeners) hears about it through :class:`~trainer_core.monitor.events.RunEvents`.

Under torchrun every rank runs this same recipe; what differs with several processes (who
claims the directory and writes files, the share of each step a rank trains, collectives) is
behind ``run.dist`` and lives in :mod:`trainer_core.train.distributed`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from trainer_core.config import Resolved, TrainerConfig, to_dict
from trainer_core.files import write_json_atomic
from trainer_core.model import adapters
from trainer_core.model.loading import fit_to_model, model_directory, quiet_hf
from trainer_core.monitor.console import print_plan
from trainer_core.monitor.events import RunEnd, RunEvents, RunListener, RunStart
from trainer_core.plugins.registry import build_profile, check_report_to
from trainer_core.train.distributed import (
    distributed_session,
    is_main,
    main_first,
    resume_checkpoint,
    share_from_main,
)
from trainer_core.train.engine import TrainingSetup
from trainer_core.train.inputs import load_rows, prepare_examples
from trainer_core.train.loop import (  # noqa: F401  (Run and save_run_tokenizer: re-exported)
    Loop,
    Run,
    current_segment,
    model_finite,
    save_run_tokenizer,
)
from trainer_core.train.manifest import plan_summary, resume_facts, run_manifest
from trainer_core.train.rundir import (
    CONFIG_FILE,
    claim_output,
    locate_output,
    outcome_recorded,
    record_outcome,
    resume_hint,
    truncate_logs,
)
from trainer_core.train.signals import StopRequested
from trainer_core.train.step import prepare_training


def run_training(resolved: Resolved, dry_run: bool = False, unlock: bool = False,
                 quiet: bool = False, stream: Any = None,
                 listeners: list[RunListener] | None = None) -> dict[str, Any]:
    """Run (or plan, with ``dry_run``) one training run; returns the summary dict.

    ``listeners`` are added after the built-in ones (console, status, metrics, previews,
    manifest) and any that plugins return from the ``run_listeners`` hook.

    A run that trains and then fails or is stopped returns its summary with ``state``
    ``failed``/``interrupted`` and a one-line ``reason``. Before that: ``UserError`` (exit 2)
    for what the user gave; ``RunFailure`` (exit 1) for a signal or an I/O error (disk full)
    outside the loop. Either way, once the output directory is claimed, its status.json and
    run.json end with the final state.

    Under torchrun (several processes) every rank calls this; rank 0 alone claims the output
    directory, has listeners and writes files.
    """
    with distributed_session(resolved.config, dry_run) as dist:
        return _run_training(resolved, dist, dry_run, unlock, quiet, stream, listeners)


def _run_training(resolved: Resolved, dist: Any, dry_run: bool, unlock: bool, quiet: bool,
                  stream: Any, listeners: list[RunListener] | None) -> dict[str, Any]:
    cfg = resolved.config
    started = time.time()
    err = stream or sys.stderr

    def note(text: str) -> None:
        print(text, file=err, flush=True)

    profile = build_profile(cfg)
    check_report_to(cfg)
    train_rows, val_rows, skipped = load_rows(cfg)
    quiet_hf()
    model_dir = main_first(dist, lambda: model_directory(cfg))
    cfg = fit_to_model(resolved, model_dir)
    claimed: list[Any] = []  # rank 0's lock on the output directory

    def locate_and_claim() -> Any:
        target = locate_output(cfg, model_dir, dry_run, unlock, note)
        claimed.append(None if dry_run else claim_output(target, cfg, unlock))
        return target

    target = share_from_main(dist, locate_and_claim)
    lock = claimed[0] if claimed else None
    if dist is not None and lock is not None:  # a peer's failure, seen by the watchdog
        dist.on_abort = lambda why: record_outcome(target.output_dir, "failed", why)
    with outcome_recorded(target, lock, resume_hint(cfg, target)) as began:
        with StopRequested(deferred=False):
            return _train(cfg, target, profile, model_dir, train_rows, val_rows, skipped,
                          dry_run, quiet, stream, listeners, started, note, began, dist)


def _train(cfg: TrainerConfig, target: Any, profile: Any, model_dir: Path, train_rows: list,
           val_rows: list, skipped: dict[str, int], dry_run: bool, quiet: bool, stream: Any,
           listeners: list[RunListener] | None, started: float, note: Any, began: list[bool],
           dist: Any = None) -> dict[str, Any]:
    """Tokenizer and data -> plan (``--dry-run`` stops here) -> model and resume state ->
    listeners -> the loop -> final model -> end event, in a claimed output directory."""
    from trainer_core.data.tokenizer import check_tokenizer, load_tokenizer
    from trainer_core.train.checkpoint import checkpoint_to_resume

    output_dir = target.output_dir
    tokenizer = load_tokenizer(cfg.model.tokenizer or str(model_dir),
                               trust_remote_code=cfg.model.trust_remote_code)
    check_tokenizer(tokenizer, target.facts.get("vocab_size"), cfg.model.chat_template == "chatml")
    train_examples, val_examples, stats = main_first(  # rank 0 builds the cache first
        dist, lambda: prepare_examples(cfg, profile, tokenizer, train_rows, val_rows, skipped))
    from trainer_core.data.batching import plan_steps

    hp = cfg.hyperparams
    plan = plan_steps(len(train_examples), hp.batch_size * hp.gradient_accumulation,
                      hp.num_epochs, hp.max_steps, cfg.data.seed, cfg.data.shuffle)
    summary = plan_summary(cfg, profile, model_dir, output_dir, plan, train_rows, val_rows,
                           skipped, stats)
    facts = resume_facts(cfg, profile, tokenizer, plan.total_steps, dist.world if dist else 1)
    checkpoint, accepted = (resume_checkpoint(dist, lambda: checkpoint_to_resume(
        output_dir, target.resume_from, facts, plan.total_steps, cfg.output.allow_changes, note))
                            if target.resume and not target.restart else (None, []))
    if dry_run:
        print_plan(summary, stream or sys.stderr)
        return summary

    # Listeners are built before the model loads: a tracker whose package is missing fails now.
    # Several processes: rank 0 alone has listeners and writes files.
    events = RunEvents(run_listeners(cfg, output_dir, quiet, stream) + list(listeners or [])
                       if is_main(dist) else [])
    try:
        setup = prepare_training(cfg, model_dir, plan.total_steps, target.facts, parallel=dist)
        state = resume_state(checkpoint, setup, accepted, facts)
        if is_main(dist):
            write_json_atomic(output_dir / CONFIG_FILE, to_dict(cfg))  # once the run can go on
            if checkpoint is not None:
                truncate_logs(output_dir, cfg, state["step"])
        from trainer_core.generate.previews import preview_prompts

        prompts = preview_prompts(val_rows or train_rows, profile, cfg.monitoring.num_preview_samples,
                                  cfg.data.seed + 1)
        run = Run(cfg, profile, tokenizer, plan, setup, train_examples, val_examples, prompts,
                  output_dir, events, state, start_step=state["step"], facts=facts, note=note,
                  hint=resume_hint(cfg, target), dist=dist,
                  saver=background_saver(cfg, setup.device, dist))
        summary.update(train_examples=len(train_examples), precision=setup.precision,
                       device_type=setup.device.type,
                       resumed_from=str(checkpoint.path) if checkpoint is not None else None,
                       accepted_changes=[f"{k}: {a} -> {b}" for k, _, a, b in accepted])
        if dist is not None:
            summary.update(world_size=dist.world, distributed=dist.strategy)
        began.append(True)
        events.start(RunStart(str(output_dir), plan.total_steps, state["step"],
                              checkpoint is not None, started, summary, to_dict(cfg),
                              run_manifest(cfg, profile, summary)))
        final_state, reason = Loop(run).train()
        final_state, reason = save_final_model(run, final_state, reason)
        summary.update(final_summary(run, final_state, started), reason=reason)
        events.end(RunEnd(final_state, reason, summary))
    finally:
        events.close()
    return summary


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
    from trainer_core.train.manifest import ManifestListener
    from trainer_core.train.rundir import METRICS_FILE, PREVIEWS_FILE, STATUS_FILE

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


def resume_state(checkpoint: Any, setup: TrainingSetup, accepted: list | None = None,
                 facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fresh counters, or the checkpoint's (weights, optimizer, schedule and RNG restored, and
    the accepted changes applied so the new values are the ones used)."""
    if checkpoint is None:
        return {"step": 0, "tokens_trained": 0, "tokens_seen": 0, "first_loss": None,
                "history": [], "segments": [], "train_time_s": 0.0}
    from trainer_core.train.checkpoint import apply_allowed_changes

    state = setup.engine.load(checkpoint)  # several processes: each rank takes its part
    if accepted:
        apply_allowed_changes(accepted, setup.optimizer, setup.scheduler, facts or {})
    state.setdefault("segments", [])
    state.setdefault("train_time_s", 0.0)
    return state


def background_saver(cfg: TrainerConfig, device: Any, dist: Any) -> Any:
    """A :class:`BackgroundCheckpoint` where ``environment.async_checkpoint`` wants one."""
    switch = cfg.environment.async_checkpoint
    if dist is not None or switch == "off" or (switch == "auto" and device.type != "cuda"):
        return None
    from trainer_core.train.checkpoint import BackgroundCheckpoint

    return BackgroundCheckpoint()


def save_final_model(run: Run, final_state: str, reason: str | None) -> tuple[str, str | None]:
    """Write the model and tokenizer of a completed run, unless its weights are not finite."""
    if final_state != "completed":
        return final_state, reason
    if not model_finite(run):
        return "failed", "error: non-finite weights at the end of training; no model written."
    # several processes: rank 0 writes (FSDP: the full state, gathered by every rank)
    state_dict = run.setup.engine.full_model_state()
    error = None
    if is_main(run.dist):
        try:
            if adapters.is_adapter_model(run.setup.model):  # adapter/ and the merged model
                adapters.save_final(run.setup.model, model_directory(run.cfg), run.output_dir,
                                    run.cfg.output.save_merged)
            else:
                save_model_as_base(run.setup.model, model_directory(run.cfg), run.output_dir,
                                   state_dict)
            save_run_tokenizer(run, run.output_dir)
        except OSError as exc:
            error = (f"error: cannot write the final model: {exc.strerror or exc}; "
                     "the checkpoints are kept")
    if run.dist is not None:
        run.dist.barrier()
    return ("failed", error) if error else (final_state, reason)


def save_model_as_base(model: Any, base_dir: Path, output_dir: Path,
                       state_dict: dict[str, Any] | None = None) -> None:
    """Save the weights with the base model's inference settings, not training's.

    Training turns ``use_cache`` off; the saved ``config.json`` gets the base's value back, and
    the base's ``generation_config.json`` is kept as it was. Only the weights (and ``dtype``
    when ``model.dtype`` differs from the base's) change. ``state_dict`` replaces the model's
    own (a sharded model's gathered full state).
    """
    import json
    import shutil

    base_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    trained_use_cache = model.config.use_cache
    model.config.use_cache = base_config.get("use_cache", True)
    try:
        model.save_pretrained(output_dir, safe_serialization=True, state_dict=state_dict)
    finally:
        model.config.use_cache = trained_use_cache
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", output_dir / "generation_config.json")


def final_summary(run: Run, final_state: str, started: float) -> dict[str, Any]:
    state = run.state
    # tokens_seen counts every segment's tokens (restored from the checkpoint), so the rate
    # divides by the time of every segment, not by this process's alone.
    train_time = state.get("train_time_s", 0.0) + (time.time() - run.loop_start)
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
        "segments": [*state.get("segments", []), current_segment(run, state["step"])],
        "warnings": list(run.warnings),
        "precision": run.setup.precision,
        "device": str(run.setup.device),
    }

