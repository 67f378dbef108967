"""The built-in run listeners: the console, ``status.json``, ``metrics.jsonl``, ``previews.jsonl``.

Each one owns one output and reacts only to run events (``trainer_core.monitor.events``).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from trainer_core.files import append_jsonl
from trainer_core.monitor.console import print_summary, short_scores
from trainer_core.monitor.events import (
    Alert,
    Evaluation,
    Preview,
    RunEnd,
    RunListener,
    RunStart,
    StepEnd,
)
from trainer_core.monitor.progress import Progress
from trainer_core.monitor.status import StatusWriter


class ConsoleListener(RunListener):
    """The progress bar or log lines, eval and preview lines, and the final summary."""

    def __init__(self, quiet: bool, stream: Any):
        self.quiet = quiet
        self.stream = stream
        self.progress: Progress | None = None

    def on_start(self, event: RunStart) -> None:
        self.progress = Progress(event.total_steps, self.quiet, self.stream)
        s = event.summary
        self.progress.line(
            f"training {s['profile']['name']} on {s['train_examples']} examples for "
            f"{event.total_steps} steps ({s['precision']}, {s['device_type']}) -> "
            f"{event.output_dir}"
            + (f" (resumed at step {event.start_step})" if event.resumed else ""))

    def on_step_end(self, event: StepEnd) -> None:
        assert self.progress is not None
        self.progress.show(event.step, event.loss, event.lr, event.tokens_per_s, event.eta_s)

    def on_evaluation(self, event: Evaluation) -> None:
        assert self.progress is not None
        self.progress.line(f"step {event.step}: eval_loss {event.eval_loss:.4f}")

    def on_preview(self, event: Preview) -> None:
        assert self.progress is not None
        for r in event.records:
            self.progress.line(f"  preview@{event.step}: {r['output'][:100]!r} "
                               f"{short_scores(r['scores'])}")

    def on_alert(self, event: Alert) -> None:
        line = f"alert {event.state}: {event.name}: {event.message}"
        if self.progress is not None:
            self.progress.line(line)
        elif not self.quiet:
            self.stream.write(line + "\n")

    def on_end(self, event: RunEnd) -> None:
        if self.progress is not None:
            if event.reason:
                self.progress.line(event.reason)
            self.progress.close()
        if not self.quiet:
            print_summary(event.summary, self.stream)


class StatusListener(RunListener):
    """Keeps ``status.json`` current (throttled; forced at the end and on alerts).

    ``last_event_at`` and ``stall_after_s`` let a reader tell a hung run on its own
    (``monitor.status.read_status``); ``alerts`` holds the active alerts.
    """

    def __init__(self, path: Path, interval_s: float, stall_after_s: float | None = None):
        self.path = path
        self.interval_s = interval_s
        self.stall_after_s = stall_after_s
        self.writer: StatusWriter | None = None
        self.alerts: dict[str, dict[str, Any]] = {}

    def on_start(self, event: RunStart) -> None:
        self.writer = StatusWriter(self.path, self.interval_s, {
            "state": "running", "total_steps": event.total_steps, "step": event.start_step,
            "output_dir": event.output_dir, "started_at": event.started_at,
            "pid": os.getpid(), "host": socket.gethostname(), "last_event_at": time.time(),
            "stall_after_s": self.stall_after_s, "alerts": []})

    def on_step_end(self, event: StepEnd) -> None:
        assert self.writer is not None
        self.writer.update(step=event.step, loss=event.loss, lr=event.lr,
                           tokens_per_s=event.tokens_per_s, eta_s=event.eta_s, epoch=event.epoch,
                           tokens_trained=event.tokens_trained, last_event_at=time.time())

    def on_evaluation(self, event: Evaluation) -> None:
        assert self.writer is not None
        self.writer.update(eval_loss=event.eval_loss, last_event_at=time.time())

    def on_preview(self, event: Preview) -> None:
        assert self.writer is not None
        self.writer.update(previews=event.records, last_event_at=time.time())

    def on_alert(self, event: Alert) -> None:
        if event.state == "raised":
            self.alerts[event.name] = event.as_record()
        else:
            self.alerts.pop(event.name, None)
        if self.writer is not None:
            self.writer.update(force=True, alerts=list(self.alerts.values()))

    def on_end(self, event: RunEnd) -> None:
        if self.writer is not None:
            self.writer.update(force=True, state=event.state, step=event.summary["steps_done"])


class MetricsListener(RunListener):
    """Appends each step's record to ``metrics.jsonl`` when the step has one, and each alert."""

    def __init__(self, path: Path):
        self.path = path

    def on_step_end(self, event: StepEnd) -> None:
        if event.record is not None:
            append_jsonl(self.path, event.record)

    def on_alert(self, event: Alert) -> None:
        # Alert records carry an ``alert`` key and no ``loss``: readers tell them apart.
        append_jsonl(self.path, event.as_record())


class PreviewsListener(RunListener):
    """Appends every preview generation to ``previews.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def on_preview(self, event: Preview) -> None:
        for r in event.records:
            append_jsonl(self.path, r)

