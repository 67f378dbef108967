"""The run-lifecycle seam: events a training run emits, and the listeners that watch them.

The recipe (``trainer_core.train.recipe``) does the work: it trains, evaluates, generates
previews and saves checkpoints. Everything that only *watches* a run (the console, status.json,
metrics.jsonl, previews.jsonl, and later trackers, alerts, a daemon, rank-0-only I/O) is a
:class:`RunListener` fed by :class:`RunEvents`. A new watcher is a new listener, never a new
branch in the loop.

Events, in the order one run emits them::

    start -> (step_end [evaluation] [preview] ... [checkpoint])* -> end

plus ``alert`` events at any point in between: a listener (``monitor.alerts``) derives them from
the others and emits them through the same fan-out (see :meth:`RunListener.attach`), and the
recipe emits one itself when a step's loss is not finite, just before the failed ``end``.

Per step the recipe emits ``evaluation`` and ``preview`` (when they happen) *before* ``step_end``,
so the step's record already carries ``eval_loss`` and preview scores; ``checkpoint`` comes after
``step_end``, so a checkpoint never holds a step whose record has not been written.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs


@attrs.frozen
class RunStart:
    """The run is about to train (after the plan, model and resume state are ready)."""

    output_dir: str
    total_steps: int
    start_step: int  #: 0, or the checkpoint's step when resuming
    resumed: bool
    started_at: float  #: time.time() when the run began (before data loading)
    summary: dict[str, Any]  #: the plan: profile, data counts, steps, precision, device
    config: dict[str, Any]  #: the resolved config as a nested dict
    manifest: dict[str, Any]  #: what run.json records (versions, dataset sha256, plugins)


@attrs.frozen
class StepEnd:
    """One optimizer step finished (after its evaluation and previews, if any ran).

    ``record`` is what the step contributes to ``metrics.jsonl``: the training numbers on
    logging steps, plus ``eval_loss`` and ``preview/<score>`` when those ran; ``None`` when the
    step logs nothing.
    """

    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float  #: over the current logging window
    eta_s: float
    epoch: float
    tokens_trained: int  #: cumulative trained (label) tokens
    record: dict[str, Any] | None
    #: cumulative processed tokens (the examples' input tokens, padding excluded): what every
    #: tokens/s of a run counts (progress line, status.json, metrics.jsonl, run.json, alerts)
    tokens_seen: int = 0


@attrs.frozen
class Evaluation:
    step: int
    eval_loss: float | None


@attrs.frozen
class Preview:
    """Generations for the held-out preview prompts, each with the profile's scores."""

    step: int
    records: list[dict[str, Any]]  #: step, prompt, output, reference, scores
    scores: dict[str, float]  #: ``preview/<score>`` averaged over the records


@attrs.frozen
class CheckpointSaved:
    step: int
    path: str


@attrs.frozen
class Alert:
    """An alert changed state: ``raised`` (printed once) or ``cleared`` (printed once).

    ``name`` is the rule (throughput, loss_spike, val_gap, grad_norm, non_finite, stalled,
    memory_underused); ``level`` is info, warning or error; ``message`` is one line with the
    numbers behind it and what to do.
    """

    name: str
    state: str  #: raised | cleared
    level: str
    step: int
    message: str
    time: float

    def as_record(self) -> dict[str, Any]:
        """The alert as a ``metrics.jsonl`` / ``status.json`` record."""
        return {"step": self.step, "alert": self.name, "state": self.state,
                "level": self.level, "message": self.message, "time": self.time}


@attrs.frozen
class RunEnd:
    """The run is over; ``state`` is completed, failed or interrupted."""

    state: str
    reason: str | None  #: why a run did not complete (one line), else None
    summary: dict[str, Any]  #: the final summary (also written to run.json)


class RunListener:
    """Base class for things that watch a run; override only the events you need.

    Listeners are called in order, synchronously, on the training thread (rank 0 only under
    several processes): keep them cheap, or hand work to a thread of your own.
    """

    def on_start(self, event: RunStart) -> None: ...

    def on_step_end(self, event: StepEnd) -> None: ...

    def on_evaluation(self, event: Evaluation) -> None: ...

    def on_preview(self, event: Preview) -> None: ...

    def on_checkpoint(self, event: CheckpointSaved) -> None: ...

    def on_alert(self, event: Alert) -> None: ...

    def on_end(self, event: RunEnd) -> None: ...

    def attach(self, events: RunEvents) -> None:
        """Called once with the fan-out this listener belongs to, before any event.

        A listener that derives events (the alerts listener) keeps ``events`` and emits through
        it, so every other listener hears them. The default does nothing.
        """

    def close(self) -> None:
        """Release resources; called once after ``on_end`` (or on a crash)."""


class RunEvents:
    """Fans each event out to the listeners, in the order they were given.

    Emission is serialised by a re-entrant lock: a listener may emit from inside a callback
    (an alert derived from a step) or from its own thread (the stall watchdog) without two
    events interleaving in any listener.
    """

    def __init__(self, listeners: list[RunListener]):
        self.listeners = list(listeners)
        self._lock = threading.RLock()
        for listener in self.listeners:
            listener.attach(self)

    def _emit(self, method: str, event: Any) -> None:
        with self._lock:
            for listener in self.listeners:
                getattr(listener, method)(event)

    def start(self, event: RunStart) -> None:
        self._emit("on_start", event)

    def step_end(self, event: StepEnd) -> None:
        self._emit("on_step_end", event)

    def evaluation(self, event: Evaluation) -> None:
        self._emit("on_evaluation", event)

    def preview(self, event: Preview) -> None:
        self._emit("on_preview", event)

    def checkpoint(self, event: CheckpointSaved) -> None:
        self._emit("on_checkpoint", event)

    def alert(self, event: Alert) -> None:
        self._emit("on_alert", event)

    def end(self, event: RunEnd) -> None:
        self._emit("on_end", event)

    def close(self) -> None:
        with self._lock:
            for listener in self.listeners:
                listener.close()
