"""Alerts computed while a run trains, from its own events.

:class:`AlertsListener` watches the run and emits an :class:`~trainer_core.monitor.events.Alert`
event each time a rule changes state (raised, then cleared), so every other listener hears it
once: the console prints it, ``status.json`` keeps the active ones, ``metrics.jsonl`` and the
trackers log it. The rules, tuned by the ``monitoring`` config section:

* ``throughput``: tokens/s (processed tokens, as everywhere in a run; median of recent clean
  steps) below a fraction of the run's own baseline; off on the CPU unless
  ``throughput_drop`` is set (a CPU shared with other work slows down and recovers on its own).
  Step times are measured between ``step_end`` events; a step whose interval holds an
  evaluation, a preview or a checkpoint is left out, so slow bookkeeping never looks like a
  slow GPU.
* ``loss_spike``: a step's loss far above the median of a rolling window.
* ``grad_norm``: a gradient norm far above the median of a rolling window.
* ``val_gap``: validation minus training loss grown at several evaluations in a row while
  the validation loss rose (a gap that grows while validation loss still falls is not
  overfitting yet).
* ``non_finite``: a non-finite evaluation loss (the recipe emits the training-loss case itself,
  see :func:`non_finite_alert`, since such a step ends the run before ``step_end``).
* ``stalled``: no event for ``stall_after_s`` (a watchdog thread; readers of ``status.json`` can
  tell on their own from ``last_event_at``, see ``monitor.status.read_status``).
* ``memory_underused``: on CUDA, peak memory at one step far below the card's memory.

Each rule costs a few list operations per step (``bench/monitor_overhead.py`` measures it).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from trainer_core.monitor.events import (
    Alert,
    CheckpointSaved,
    Evaluation,
    Preview,
    RunEnd,
    RunEvents,
    RunListener,
    RunStart,
    StepEnd,
)

#: ``monitoring.throughput_drop`` when unset, on a GPU (on the CPU the rule is off).
DEFAULT_THROUGHPUT_DROP = 0.5

#: Every alert name, for readers and docs.
ALERT_NAMES = ("throughput", "loss_spike", "grad_norm", "val_gap", "non_finite", "stalled",
               "memory_underused")


def non_finite_alert(step: int, loss: float, grad_norm: float) -> Alert:
    """The alert for a training step whose loss or gradient norm is not finite."""
    return Alert("non_finite", "raised", "error", step,
                 f"loss {loss}, gradient norm {grad_norm} at step {step}: the run stops; lower "
                 "the learning rate or enable clipping (hyperparams.max_grad_norm)", time.time())


def cuda_memory_probe() -> tuple[int, int] | None:
    """(peak bytes allocated, total bytes) of the current CUDA device, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    return (torch.cuda.max_memory_allocated(device),
            torch.cuda.get_device_properties(device).total_memory)


class AlertsListener(RunListener):
    """Computes the alerts and emits each change of state once.

    ``memory_probe`` returns (peak bytes, total bytes) or None; it defaults to the CUDA probe
    on CUDA runs (tests inject their own). ``clock`` is ``time.time`` (tests may replace it).
    """

    def __init__(self, monitoring: Any, memory_probe: Callable[[], tuple[int, int] | None]
                 | None = None, clock: Callable[[], float] = time.time):
        self.m = monitoring
        self.clock = clock
        self.memory_probe = memory_probe
        self.events: RunEvents | None = None
        self.active: dict[str, Alert] = {}
        self.step = 0
        self._losses: deque[float] = deque(maxlen=monitoring.loss_window)
        self._grads: deque[float] = deque(maxlen=monitoring.loss_window)
        # throughput: (time, tokens_seen) of the last step_end; was its interval clean?
        self._last: tuple[float, int] | None = None
        self._dirty = False
        self._steps_timed = 0
        self._baseline: list[float] = []
        self._recent: deque[float] = deque(maxlen=monitoring.throughput_window)
        self._gaps: list[float] = []
        self._evals: list[float] = []
        self._throughput_drop = monitoring.throughput_drop
        self._last_event = clock()
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- plumbing

    def attach(self, events: RunEvents) -> None:
        self.events = events

    def _set(self, name: str, on: bool, level: str = "warning", message: str = "") -> None:
        """Raise or clear ``name``; emit only on a change of state.

        The state changes under our own lock (the watchdog thread calls this too); the event is
        emitted outside it, so this lock is never held while waiting for the fan-out's.
        """
        with self._lock:
            if on and name not in self.active:
                alert = Alert(name, "raised", level, self.step, message, self.clock())
                self.active[name] = alert
            elif not on and name in self.active:
                alert = Alert(name, "cleared", self.active.pop(name).level, self.step,
                              message or f"{name} back to normal", self.clock())
            else:
                return
        if self.events is not None:
            self.events.alert(alert)

    def _touch(self) -> None:
        self._last_event = self.clock()
        if "stalled" in self.active:
            self._set("stalled", False, message=f"steps again at step {self.step}")

    # ----------------------------------------------------------------- events

    def on_start(self, event: RunStart) -> None:
        self.step = event.start_step
        self._last_event = self.clock()
        device = event.summary.get("device_type")
        if self.memory_probe is None and device == "cuda":
            self.memory_probe = cuda_memory_probe
        if self._throughput_drop is None:
            self._throughput_drop = 0.0 if device in (None, "cpu") else DEFAULT_THROUGHPUT_DROP
        self._watchdog = threading.Thread(target=self._watch, name="trainer-stall-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def on_step_end(self, event: StepEnd) -> None:
        self.step = event.step
        self._touch()
        self._throughput(event)
        self._spike("loss_spike", self._losses, event.loss, self.m.loss_spike_factor, "loss",
                    "lower the learning rate or check the data near this step")
        self._spike("grad_norm", self._grads, event.grad_norm, self.m.grad_norm_factor,
                    "gradient norm", "lower the learning rate or keep max_grad_norm clipping on")
        if event.step == self.m.memory_check_step and self.memory_probe is not None:
            self._memory()

    def on_evaluation(self, event: Evaluation) -> None:
        self._dirty = True
        self._touch()
        loss = event.eval_loss
        if loss is None:
            return
        if not math.isfinite(loss):
            self._set("non_finite", True, "error",
                      f"validation loss {loss} at step {event.step}")
            return
        if not self._losses:
            return
        gap = loss - statistics.median(self._losses)
        self._gaps.append(gap)
        self._evals.append(loss)
        n = self.m.val_gap_evals
        recent = self._gaps[-(n + 1):]
        growing = len(recent) == n + 1 and all(recent[i + 1] > recent[i] for i in range(n))
        rising = len(self._evals) > n and loss > self._evals[-(n + 1)]
        if growing and rising and gap > self.m.val_gap_min:
            self._set("val_gap", True, "warning",
                      f"validation loss {loss:.4f} is {gap:.4f} above training loss and the gap "
                      f"grew at the last {n} evaluations: the model is overfitting; consider "
                      "fewer epochs, more data or an earlier checkpoint")
        elif len(self._gaps) >= 2 and self._gaps[-1] <= self._gaps[-2]:
            self._set("val_gap", False, message=f"validation gap {gap:.4f} stopped growing")

    def on_preview(self, event: Preview) -> None:
        self._dirty = True
        self._touch()

    def on_checkpoint(self, event: CheckpointSaved) -> None:
        self._dirty = True
        self._touch()

    def on_end(self, event: RunEnd) -> None:
        self._stop.set()
        # A run that ended is not hung; the other alerts stay as the run's last word.
        self._set("stalled", False, message=f"run {event.state}")

    def close(self) -> None:
        self._stop.set()

    # ----------------------------------------------------------------- rules

    def _throughput(self, event: StepEnd) -> None:
        now = self.clock()
        last, self._last = self._last, (now, event.tokens_seen)
        dirty, self._dirty = self._dirty, False
        if last is None:
            return
        self._steps_timed += 1
        elapsed = now - last[0]
        drop = self._throughput_drop or 0.0
        if (not drop or dirty or elapsed <= 0
                or self._steps_timed <= self.m.throughput_warmup_steps):
            return
        rate = (event.tokens_seen - last[1]) / elapsed
        window = self.m.throughput_window
        if len(self._baseline) < window:
            self._baseline.append(rate)
            return
        self._recent.append(rate)
        if len(self._recent) < window:
            return
        base = statistics.median(self._baseline)
        current = statistics.median(self._recent)
        if current < drop * base:
            self._set("throughput", True, "warning",
                      f"{current:,.0f} tok/s, below {drop:.0%} of this run's baseline "
                      f"{base:,.0f} tok/s: is something else using the device, or is it "
                      "throttling?")
        else:
            self._set("throughput", False,
                      message=f"throughput back to {current:,.0f} tok/s")

    def _spike(self, name: str, window: deque[float], value: float, factor: float, what: str,
               advice: str) -> None:
        if not math.isfinite(value):
            self._set("non_finite", True, "error", f"{what} {value} at step {self.step}")
            return
        full = len(window) == window.maxlen
        ref = statistics.median(window) if full else None
        if ref is not None and ref > 0 and value > factor * ref:
            self._set(name, True, "warning",
                      f"{what} {value:.4g} at step {self.step} is {value / ref:.1f}x the median "
                      f"{ref:.4g} of the last {len(window)} steps: {advice}")
        elif ref is not None:
            self._set(name, False, message=f"{what} back to {value:.4g} at step {self.step}")
        window.append(value)

    def _memory(self) -> None:
        assert self.memory_probe is not None
        probe = self.memory_probe()
        if probe is None:
            return
        used, total = probe
        if total > 0 and used < self.m.memory_low_fraction * total:
            self._set("memory_underused", True, "info",
                      f"peak GPU memory {used / 2**30:.1f} GiB of {total / 2**30:.1f} GiB "
                      f"({used / total:.0%}) at step {self.step}: a larger batch_size (or "
                      "data.max_tokens_per_batch) would use the GPU better")

    def _watch(self) -> None:
        """The stall watchdog: wakes a few times per ``stall_after_s`` until the run ends."""
        limit = self.m.stall_after_s
        while not self._stop.wait(min(max(limit / 4, 0.05), 5.0)):
            idle = self.clock() - self._last_event
            if idle > limit and "stalled" not in self.active:
                self._set("stalled", True, "error",
                          f"no step for {idle:.0f} s after step {self.step} (limit "
                          f"{limit:g} s): the run may be hung (data loader, collective, disk)")
