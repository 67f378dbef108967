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

Under torchrun every rank runs this same recipe; what differs with several processes (who
claims the directory and writes files, the share of each step a rank trains, collectives) is
behind ``run.dist`` and lives in :mod:`trainer_core.train.distributed`.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from trainer_core.config import Resolved, TrainerConfig, to_dict
from trainer_core.files import write_json_atomic
from trainer_core.model import adapters
from trainer_core.model.loading import fit_to_model, model_directory, quiet_hf
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
from trainer_core.train.distributed import (
    distributed_session,
    is_main,
    main_first,
    resume_checkpoint,
    share_from_main,
)
from trainer_core.train.engine import LaunchedStep, TrainingSetup
from trainer_core.train.inputs import Prefetcher, load_rows, prepare_examples, token_budget
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
from trainer_core.train.step import launch_step, prepare_training, runs_ahead

if TYPE_CHECKING:
    from trainer_core.data.batching import StepPlan


@attrs.define
class Run:
    """What the loop and its named steps share: the plan, the model, the data, the counters."""

    cfg: TrainerConfig
    profile: Any
    tokenizer: Any
    plan: StepPlan
    setup: TrainingSetup
    #: Sequences of ``{"input_ids", "labels"}`` (a lazy view over the preprocessed arrays).
    train_examples: Sequence[dict[str, Any]]
    val_examples: Sequence[dict[str, Any]]
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
    #: what a checkpoint records about how the run was shaped (see manifest.resume_facts)
    facts: dict[str, Any] = attrs.Factory(dict)
    note: Any = print  #: prints a line the user must see (warnings), even when quiet
    hint: str = "continue with the same command plus --resume"
    warnings: list[str] = attrs.Factory(list)
    previews_off: bool = False
    #: several processes (torchrun): this rank's :class:`~trainer_core.train.distributed.Distributed`
    dist: Any = None
    #: checkpoints written in a thread (:class:`~trainer_core.train.checkpoint.BackgroundCheckpoint`)
    saver: Any = None


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
        print_plan(cfg, summary, stream or sys.stderr)
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
        final_state, reason = train_loop(run)
        final_state, reason = save_final_model(run, final_state, reason)
        summary.update(final_summary(run, final_state, started), reason=reason)
        events.end(RunEnd(final_state, reason, summary))
    finally:
        events.close()
    return summary


def train_loop(run: Run) -> tuple[str, str | None]:
    """Steps until the plan is done, a signal arrives or a step fails; returns (state, reason).

    A checkpoint still being written in the background is finished before this returns.
    """
    state, reason = run_steps(run)
    error = finish_checkpoint(run, block=True)
    if error and state != "failed":
        return "failed", error
    return state, reason


def run_steps(run: Run) -> tuple[str, str | None]:
    """The step loop. A step left running on the GPU (:func:`launch_step`) is read after the
    next one is launched, so the card never waits for the host between steps; a step after
    which the model is looked at (evaluation, preview, checkpoint, a signal, the end) is read
    before anything else is launched. A signal that arrives while a step is read with the next
    one already running stops the run after that next step (it is saved there)."""
    run.loop_start = run.window_start = time.time()
    # The next step's batches are collated while this one trains (one process: under torchrun
    # each rank computes its share in step, as before).
    inputs = Prefetcher(lambda s: step_batches(run, s), run.plan.total_steps,
                        ahead=run.dist is None)
    pending: Launched | None = None  # launched, not read yet
    # Under torchrun, Ctrl-C can reach a rank twice (directly and forwarded): one request.
    with StopRequested(deferred=True, repeat_window_s=1.0 if run.dist else 0.0) as stop, inputs:
        try:
            for step in range(run.state["step"], run.plan.total_steps):
                batches, n_trained = inputs.get(step)
                if pending is not None and not runs_ahead(run.setup, batches):
                    # this step runs to its end at launch (eager, a capture): nothing to overlap
                    outcome = finish_step(run, pending, stop, in_flight=False)
                    pending = None
                    if outcome is not None:
                        return outcome
                current = Launched(step, batches, n_trained, launch_step(
                    run.setup, batches, n_trained, run.cfg.hyperparams.max_grad_norm,
                    launched=functools.partial(inputs.prepare, step + 1)))
                previous, pending = pending, current
                if previous is not None:  # the step before, read while this one runs
                    outcome = finish_step(run, previous, stop, in_flight=True)
                    if outcome is not None:
                        return outcome  # (the finally waits for this step)
                if current.step.running and can_overlap(run, step + 1, stop):
                    continue
                pending = None
                outcome = finish_step(run, current, stop, in_flight=False)
                if outcome is not None:
                    return outcome
        finally:
            if pending is not None:  # nothing stays queued once the loop is left
                pending.step.wait()
    return "completed", None


@attrs.define
class Launched:
    """A launched step of the loop and what it trained on."""

    index: int
    batches: list[dict[str, Any]]
    n_trained: int
    step: LaunchedStep


def can_overlap(run: Run, done: int, stop: StopRequested) -> bool:
    """Whether step ``done`` may still be running when the next one is launched: nothing
    looks at the model after it (and one process: torchrun's ranks agree every step)."""
    return not (run.dist is not None or stop.signal is not None
                or done == run.plan.total_steps or want_checkpoint(run, done)
                or evaluation_due(run, done) or preview_due(run, done))


def finish_step(run: Run, item: Launched, stop: StopRequested, in_flight: bool
                ) -> tuple[str, str | None] | None:
    """Read a launched step and do what follows it; ``(state, reason)`` if the run ends here.

    ``in_flight``: the next step is already running, so no evaluation, preview or checkpoint
    is due after this one (see :func:`can_overlap`), and a signal waits for the next step."""
    loss, grad_norm, lr = item.step.result()
    step, batches, n_trained = item.index, item.batches, item.n_trained
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        run.events.alert(non_finite_alert(step + 1, loss, grad_norm))
        return "failed", (f"error: loss {loss}, gradient norm {grad_norm} at step "
                          f"{step + 1}; stopping. The last good checkpoint is untouched "
                          "and no final model is written.")
    done = step + 1
    # several processes: global token counts, and a signal any rank got stops all
    tokens, agreed = (run.dist.step_consensus(batches, stop.signal) if run.dist
                      else (None, None))
    record = account_step(run, done, batches, n_trained, loss, lr, grad_norm, tokens)
    record = maybe_evaluate(run, done, record)
    record = maybe_preview(run, done, record)
    end_step(run, done, loss, lr, grad_norm, record)
    signal = None if in_flight else agreed if run.dist else stop.signal
    if want_checkpoint(run, done) or signal is not None:
        if not model_finite(run):
            return "failed", (f"error: non-finite weights after step {done}; stopping "
                              "without saving. The last good checkpoint is untouched.")
        try:
            save_checkpoint(run, done)
        except CheckpointWriteFailed as exc:  # the previous background save
            return "failed", str(exc)
        except OSError as exc:
            return "failed", checkpoint_error(done, exc)
    error = finish_checkpoint(run, block=False)
    if error:
        return "failed", error
    if signal is not None:
        return "interrupted", (f"stopped by signal {signal} at step {done}; "
                               f"checkpoint saved; {run.hint}.")
    return None


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
        from trainer_core.data.batching import count_tokens

        tokens = count_tokens(batches)
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
    if not evaluation_due(run, done):
        return record
    # (several processes: every rank scores a share)
    run.eval_loss = run.setup.engine.evaluate(run.val_examples, run.cfg,
                                              run.tokenizer.pad_token_id, token_budget(run.cfg))
    run.events.evaluation(Evaluation(done, run.eval_loss))
    return {**(record or {"step": done}), "eval_loss": run.eval_loss}


def maybe_preview(run: Run, done: int, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Generate and score the preview prompts every ``preview_steps`` and at the end."""
    from trainer_core.generate.previews import run_previews

    if not preview_due(run, done):
        return record
    # Several processes: rank 0 generates with its full DDP replica while the others wait at
    # the next collective; FSDP holds no full copy anywhere, so there are no previews.
    if run.previews_off or (run.dist is not None and (not run.dist.is_main
                                                      or run.dist.strategy == "fsdp")):
        return record
    try:
        records, run.preview_scores = run_previews(run.setup.model, run.tokenizer, run.profile,
                                                   run.prompts, run.cfg, done)
    except Exception as exc:  # a plugin's processors or scores: training goes on without them
        run.previews_off = True
        run.setup.model.train()
        text = f"previews and scores skipped from step {done} on: {exc}"
        run.warnings.append(text)
        run.note(f"warning: {text}")
        return record
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


def evaluation_due(run: Run, done: int) -> bool:
    """Validation after step ``done``: every ``eval_steps`` and at the end, if there is a
    validation set (:func:`maybe_evaluate`; :func:`can_overlap` reads it too)."""
    hp = run.cfg.hyperparams
    return bool(run.val_examples) and bool((hp.eval_steps and done % hp.eval_steps == 0)
                                           or done == run.plan.total_steps)


def preview_due(run: Run, done: int) -> bool:
    """Previews after step ``done``: every ``preview_steps`` and at the end, if any are
    asked for (:func:`maybe_preview`; :func:`can_overlap` reads it too)."""
    mon = run.cfg.monitoring
    return bool(mon.num_preview_samples) and bool(
        (mon.preview_steps and done % mon.preview_steps == 0) or done == run.plan.total_steps)


def want_checkpoint(run: Run, done: int) -> bool:
    save_steps = run.cfg.hyperparams.save_steps
    return bool(save_steps and done % save_steps == 0 and done != run.plan.total_steps)


def background_saver(cfg: TrainerConfig, device: Any, dist: Any) -> Any:
    """A :class:`BackgroundCheckpoint` where ``environment.async_checkpoint`` wants one."""
    switch = cfg.environment.async_checkpoint
    if dist is not None or switch == "off" or (switch == "auto" and device.type != "cuda"):
        return None
    from trainer_core.train.checkpoint import BackgroundCheckpoint

    return BackgroundCheckpoint()


class CheckpointWriteFailed(Exception):
    """A background checkpoint could not be written (the message is the run's reason)."""


def checkpoint_error(step: int, exc: OSError) -> str:
    return (f"error: cannot write the checkpoint of step {step}: {exc.strerror or exc}; "
            "stopping. Earlier checkpoints are kept and no final model is written.")


def finish_checkpoint(run: Run, block: bool) -> str | None:
    """Announce a background checkpoint once written; its error message if writing failed."""
    if run.saver is None or not run.saver.busy:
        return None
    step = run.saver.step
    try:
        done = run.saver.wait() if block else run.saver.finished()
    except OSError as exc:
        return checkpoint_error(step, exc)
    if done is not None:
        save_run_tokenizer(run, done[1])
        run.events.checkpoint(CheckpointSaved(done[0], str(done[1])))
    return None


def save_checkpoint(run: Run, done: int) -> None:
    s = run.setup
    state = {**run.state, "segments": [*run.state["segments"], current_segment(run, done)],
             "train_time_s": run.state["train_time_s"] + (time.time() - run.loop_start)}
    if run.saver is not None:
        # One save at a time; the previous one's write error stops the run here.
        error = finish_checkpoint(run, block=True)
        if error:
            raise CheckpointWriteFailed(error)
        run.saver.start(run.output_dir, done, s.model, s.optimizer, s.scheduler, s.scaler,
                        state, run.cfg.hyperparams.save_total_limit, run.facts)
        return
    # (several processes: rank 0 writes; FSDP gathers the full state first)
    path = s.engine.save(run.output_dir, done, state, run.cfg.hyperparams.save_total_limit,
                         run.facts)
    # With the tokenizer, a checkpoint is a model directory any tool (and `trainer generate`) loads.
    if is_main(run.dist):
        save_run_tokenizer(run, path)
    run.events.checkpoint(CheckpointSaved(done, str(path)))


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


def model_finite(run: Run) -> bool:
    """Finite weights (several processes: all ranks agree)."""
    return run.setup.engine.finite()


def current_segment(run: Run, end_step: int) -> dict[str, Any]:
    """This process's stretch of training: start and end step, time spent in the loop."""
    now = time.time()
    return {"start_step": run.start_step, "end_step": end_step,
            "train_time_s": round(now - run.loop_start, 3), "started_at": run.loop_start,
            "ended_at": now}


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


def save_run_tokenizer(run: Run, dest: Path) -> None:
    """The tokenizer as loaded, carrying the chat template training rendered with."""
    from trainer_core.data.chat import TOKENIZER, resolve_template
    from trainer_core.data.tokenizer import save_tokenizer

    template = resolve_template(run.cfg.model.chat_template, run.tokenizer)
    # The tokenizer's own template is in its files already: they stay exactly the base's.
    save_tokenizer(run.tokenizer, dest, None if template.name == TOKENIZER else template.jinja)


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

