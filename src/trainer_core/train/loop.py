"""The training loop, one for ``trainer run`` and the daemon: steps of a plan through the run's
step engine, with what is due after each step, emitting run events.

:class:`Loop` takes the steps of a :class:`Run`'s plan: the next step's batches are collated on
a prefetch thread; a step left running on the device (:meth:`Engine.launch
<trainer_core.train.engine.Engine.launch>`) is read after the next one is launched, except
where the model is looked at after it (evaluation, previews, a checkpoint, a stop request, the
end). After each step: counters, evaluation and previews when due, the ``step_end`` event, a
checkpoint when due or on a stop request, and the end of the loop on a non-finite step.
Everything that watches (files, console, alerts, trackers, the daemon's protocol) is a
:class:`~trainer_core.monitor.events.RunListener`.

``trainer run`` (:mod:`trainer_core.train.recipe`) drives :class:`Loop` itself: signals are
its stop requests. The daemon's worker (:mod:`trainer_core.daemon.worker`) drives a subclass
per file: its plan is the file's, its steps continue the model's global step
(:attr:`Run.offset`), the daemon's commands are its stop requests and the file's checkpoints
its own; the hooks it overrides are marked *(hook)*.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from trainer_core.config import TrainerConfig
from trainer_core.monitor.alerts import non_finite_alert
from trainer_core.monitor.events import CheckpointSaved, Evaluation, Preview, RunEvents, StepEnd
from trainer_core.train.distributed import is_main
from trainer_core.train.engine import LaunchedStep, TrainingSetup
from trainer_core.train.inputs import Prefetcher, token_budget
from trainer_core.train.signals import StopRequested
from trainer_core.train.step import launch_step, runs_ahead

if TYPE_CHECKING:
    from trainer_core.data.batching import StepPlan

#: How a loop ended: ``(state, reason)``; ``state`` is completed, failed or interrupted (the
#: daemon's loop adds its own: skipped, paused, stopped), ``reason`` one line or None.
Ending = tuple[str, "str | None"]


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
    #: the global step before the plan's first step (the daemon: the model's step when the
    #: file began; ``trainer run``: 0). Counters, events and checkpoints use global steps.
    offset: int = 0

    @property
    def total_steps(self) -> int:
        """The global step at the end of the plan."""
        return self.offset + self.plan.total_steps


@attrs.define
class Launched:
    """A launched step of the loop and what it trained on."""

    index: int  #: the step's index in the plan (global step ``offset + index + 1`` when done)
    batches: list[dict[str, Any]]
    n_trained: int
    step: LaunchedStep


class NoSignals:
    """Stop requests of a loop whose caller handles signals itself (the daemon's worker)."""

    signal: int | None = None


class Loop:
    """The loop of ``trainer run``; see the module doc."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def train(self) -> Ending:
        """Steps until the plan is done, a stop request or a failed step; returns
        ``(state, reason)``. A checkpoint still being written in the background is finished
        before this returns."""
        state, reason = self.steps()
        error = finish_checkpoint(self.run, block=True)
        if error and state != "failed":
            return "failed", error
        return state, reason

    def steps(self) -> Ending:
        """The step loop. A step left running on the GPU (:func:`launch_step`) is read after
        the next one is launched, so the card never waits for the host between steps; a step
        after which the model is looked at (evaluation, preview, checkpoint, a stop request,
        the end) is read before anything else is launched. A signal that arrives while a step
        is read with the next one already running stops the run after that next step (it is
        saved there)."""
        run = self.run
        run.loop_start = run.window_start = time.time()
        # The next step's batches are collated while this one trains (one process: under
        # torchrun each rank computes its share in step, as before).
        inputs = Prefetcher(lambda s: step_batches(run, s), run.plan.total_steps,
                            ahead=run.dist is None)
        pending: Launched | None = None  # launched, not read yet
        with self.stop_requests() as stop, inputs:
            try:
                for step in range(run.state["step"] - run.offset, run.plan.total_steps):
                    request = self.before_step(step)
                    if request is not None:  # (the daemon: a command) the step before first
                        if pending is not None:
                            outcome = self.finish_step(pending, stop, in_flight=False)
                            pending = None
                            if outcome is not None:
                                return outcome
                        return self.stop_before(request, step)
                    batches, n_trained = inputs.get(step)
                    if pending is not None and not runs_ahead(run.setup, batches):
                        # this step runs to its end at launch (eager, a capture): no overlap
                        outcome = self.finish_step(pending, stop, in_flight=False)
                        pending = None
                        if outcome is not None:
                            return outcome
                    current = Launched(step, batches, n_trained, launch_step(
                        run.setup, batches, n_trained, run.cfg.hyperparams.max_grad_norm,
                        launched=functools.partial(inputs.prepare, step + 1)))
                    previous, pending = pending, current
                    if previous is not None:  # the step before, read while this one runs
                        outcome = self.finish_step(previous, stop, in_flight=True)
                        if outcome is not None:
                            return outcome  # (the finally waits for this step)
                    if current.step.running and self.can_overlap(run.offset + step + 1, stop):
                        continue
                    pending = None
                    outcome = self.finish_step(current, stop, in_flight=False)
                    if outcome is not None:
                        return outcome
            finally:
                if pending is not None:  # nothing stays queued once the loop is left
                    pending.step.wait()
        return "completed", None

    def can_overlap(self, done: int, stop: Any) -> bool:
        """Whether global step ``done`` may still be running when the next one is launched:
        nothing looks at the model after it (and one process: torchrun's ranks agree every
        step)."""
        run = self.run
        return not (run.dist is not None or stop.signal is not None
                    or done == run.total_steps or self.checkpoint_due(done)
                    or self.evaluation_due(done) or self.preview_due(done))

    def finish_step(self, item: Launched, stop: Any, in_flight: bool) -> Ending | None:
        """Read a launched step and do what follows it; ``(state, reason)`` if the loop ends.

        ``in_flight``: the next step is already running, so no evaluation, preview or
        checkpoint is due after this one (see :meth:`can_overlap`), and a signal waits for the
        next step."""
        run = self.run
        loss, grad_norm, lr = item.step.result()
        batches, n_trained = item.batches, item.n_trained
        done = run.offset + item.index + 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            run.events.alert(non_finite_alert(done, loss, grad_norm))
            return self.non_finite_step(done, loss, grad_norm)
        # several processes: global token counts, and a signal any rank got stops all
        tokens, agreed = (run.dist.step_consensus(batches, stop.signal) if run.dist
                          else (None, None))
        record = account_step(run, done, batches, n_trained, loss, lr, grad_norm, tokens)
        if self.evaluation_due(done):
            record = evaluate(run, done, record)
        if self.preview_due(done):
            record = preview(run, done, record)
        if record is not None:
            self.keep(record)
        end_step(run, done, loss, lr, grad_norm, record)
        signal = None if in_flight else agreed if run.dist else stop.signal
        if self.checkpoint_due(done) or signal is not None:
            if not model_finite(run):
                return self.non_finite_weights(done)
            try:
                self.save(done)
            except CheckpointWriteFailed as exc:  # the previous background save
                return "failed", str(exc)
            except OSError as exc:
                return self.save_failed(done, exc)
        error = finish_checkpoint(run, block=False)
        if error:
            return "failed", error
        if signal is not None:
            return "interrupted", (f"stopped by signal {signal} at step {done}; "
                                   f"checkpoint saved; {run.hint}.")
        return None

    # ------------------------------------------------------------------ hooks

    def stop_requests(self) -> Any:
        """(hook) The source of stop requests while the loop runs: SIGINT/SIGTERM. Under
        torchrun, Ctrl-C can reach a rank twice (directly and forwarded): one request."""
        return StopRequested(deferred=True, repeat_window_s=1.0 if self.run.dist else 0.0)

    def before_step(self, index: int) -> Any:
        """(hook) A request to end the loop before plan step ``index`` (None: go on)."""
        return None

    def stop_before(self, request: Any, index: int) -> Ending:
        """(hook) End the loop on :meth:`before_step`'s ``request`` (the step before it is
        read and done)."""
        raise NotImplementedError

    def checkpoint_due(self, done: int) -> bool:
        """(hook) A checkpoint after global step ``done``: every ``save_steps``, not at the end
        (the final model is saved there)."""
        return want_checkpoint(self.run, done)

    def evaluation_due(self, done: int) -> bool:
        """(hook) Validation after step ``done``."""
        return evaluation_due(self.run, done)

    def preview_due(self, done: int) -> bool:
        """(hook) Previews after step ``done``."""
        return preview_due(self.run, done)

    def save(self, done: int) -> None:
        """(hook) Write the checkpoint of step ``done``."""
        save_checkpoint(self.run, done)

    def save_failed(self, done: int, exc: OSError) -> Ending:
        """(hook) A checkpoint could not be written."""
        return "failed", checkpoint_error(done, exc)

    def keep(self, record: dict[str, Any]) -> None:
        """(hook) Keep a step's record in the (checkpointed) history."""
        self.run.state["history"].append(record)

    def non_finite_step(self, done: int, loss: float, grad_norm: float) -> Ending:
        """(hook) Step ``done`` was not finite (nothing was updated)."""
        return "failed", (f"error: loss {loss}, gradient norm {grad_norm} at step {done}; "
                          "stopping. The last good checkpoint is untouched and no final "
                          "model is written.")

    def non_finite_weights(self, done: int) -> Ending:
        """(hook) The weights are not finite where a checkpoint is due."""
        return "failed", (f"error: non-finite weights after step {done}; stopping without "
                          "saving. The last good checkpoint is untouched.")


# --------------------------------------------------------------------------- the named steps


def step_batches(run: Run, step: int) -> tuple[list[dict[str, Any]], int]:
    """The micro-batches of plan step ``step`` (a pure function of seed and step) and their
    trained tokens."""
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
    run.eta_s = (run.total_steps - done) / rate if rate > 0 else float("inf")
    # Step 1 is always logged: the first point of every chart is the summary's first loss.
    if done % run.cfg.environment.logging_steps and done not in (1, run.total_steps):
        return None
    run.window_tokens, run.window_start = 0, time.time()
    return {"step": done, "epoch": round(run.plan.epoch_at(done - run.offset), 4), "loss": loss,
            "lr": lr, "grad_norm": grad_norm, "tokens_per_s": run.tokens_per_s,
            "tokens_trained": state["tokens_trained"], "time": now}


def evaluate(run: Run, done: int, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validation loss (several processes: every rank scores a share)."""
    run.eval_loss = run.setup.engine.evaluate(run.val_examples, run.cfg,
                                              run.tokenizer.pad_token_id, token_budget(run.cfg))
    run.events.evaluation(Evaluation(done, run.eval_loss))
    return {**(record or {"step": done}), "eval_loss": run.eval_loss}


def preview(run: Run, done: int, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Generate and score the preview prompts."""
    from trainer_core.generate.previews import run_previews

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
    """Tell the listeners."""
    run.events.step_end(StepEnd(done, run.total_steps, loss, lr, grad_norm,
                                run.tokens_per_s, run.eta_s, run.plan.epoch_at(done - run.offset),
                                run.state["tokens_trained"], record,
                                tokens_seen=run.state["tokens_seen"]))


def evaluation_due(run: Run, done: int) -> bool:
    """Validation after step ``done``: every ``eval_steps`` and at the end, if there is a
    validation set (:meth:`Loop.can_overlap` reads it too)."""
    hp = run.cfg.hyperparams
    return bool(run.val_examples) and bool((hp.eval_steps and done % hp.eval_steps == 0)
                                           or done == run.total_steps)


def preview_due(run: Run, done: int) -> bool:
    """Previews after step ``done``: every ``preview_steps`` and at the end, if any are
    asked for (:meth:`Loop.can_overlap` reads it too)."""
    mon = run.cfg.monitoring
    return bool(mon.num_preview_samples) and bool(
        (mon.preview_steps and done % mon.preview_steps == 0) or done == run.total_steps)


def want_checkpoint(run: Run, done: int) -> bool:
    save_steps = run.cfg.hyperparams.save_steps
    return bool(save_steps and done % save_steps == 0 and done != run.total_steps)


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


def model_finite(run: Run) -> bool:
    """Finite weights (several processes: all ranks agree)."""
    return run.setup.engine.finite()


def current_segment(run: Run, end_step: int) -> dict[str, Any]:
    """This process's stretch of training: start and end step, time spent in the loop."""
    now = time.time()
    return {"start_step": run.start_step, "end_step": end_step,
            "train_time_s": round(now - run.loop_start, 3), "started_at": run.loop_start,
            "ended_at": now}


def save_run_tokenizer(run: Run, dest: Path) -> None:
    """The tokenizer as loaded, carrying the chat template training rendered with."""
    from trainer_core.data.chat import TOKENIZER, resolve_template
    from trainer_core.data.tokenizer import save_tokenizer

    template = resolve_template(run.cfg.model.chat_template, run.tokenizer)
    # The tokenizer's own template is in its files already: they stay exactly the base's.
    save_tokenizer(run.tokenizer, dest, None if template.name == TOKENIZER else template.jinja)


def no_signals() -> Any:
    """:meth:`Loop.stop_requests` for a caller that handles signals itself."""
    return contextlib.nullcontext(NoSignals())
