"""The built-in experiment trackers: TensorBoard and Trackio, as a plugin.

This module is a plugin like any third-party one: it implements the ``trackers`` and
``run_listeners`` hooks (``trainer_core.hookspecs``) and the registry loads it next to the
core's own plugin. A tracker is a :class:`~trainer_core.monitor.events.RunListener` turned on by
naming it in ``environment.report_to``; a pip-installed plugin adds one the same way.

Both log, at every logged step: loss, eval loss, lr, grad norm, tokens/s, trained tokens, epoch
and preview scores (the step's ``metrics.jsonl`` record); at the start the resolved config and
the run manifest; the preview generations; and each alert when raised or cleared.

Their packages are optional extras, imported only when the tracker is used; a missing one is a
one-line error naming the extra, raised before the model is loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

from trainer_core import hookimpl
from trainer_core.errors import UserError
from trainer_core.monitor.events import (
    Alert,
    Preview,
    RunEnd,
    RunListener,
    RunStart,
    StepEnd,
)

#: Record keys that are not metrics.
_NOT_METRICS = ("step", "time")


def _need(module: str, tracker: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"environment.report_to: {tracker} needs the {module.split('.')[0]} "
                        f"package: pip install 'trainer-core[{extra}]'") from None


def scalar_tag(key: str) -> str:
    """The tracker tag of a ``metrics.jsonl`` key: ``eval_loss`` -> ``eval/loss``,
    ``preview/x`` stays, everything else goes under ``train/``."""
    if key == "eval_loss":
        return "eval/loss"
    return key if "/" in key else f"train/{key}"


def numeric_items(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker(RunListener):
    """Event files under ``<logging_dir or output_dir>/tensorboard`` (``tensorboard --logdir``).

    Uses tensorboardX when installed, else ``torch.utils.tensorboard`` (which needs the
    ``tensorboard`` package).
    """

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        try:
            self._writer_cls = _need("tensorboardX", "tensorboard", "tensorboard").SummaryWriter
        except UserError:
            try:
                import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("environment.report_to: tensorboard needs the tensorboardX "
                                "package: pip install 'trainer-core[tensorboard]'") from None
            self._writer_cls = SummaryWriter
        self.writer: Any = None

    def on_start(self, event: RunStart) -> None:
        self.writer = self._writer_cls(str(self.log_dir), flush_secs=10)
        self.writer.add_text("config", _code(event.config), event.start_step)
        self.writer.add_text("manifest", _code(event.manifest), event.start_step)

    def on_step_end(self, event: StepEnd) -> None:
        if event.record is None:
            return
        for key, value in numeric_items(event.record).items():
            self.writer.add_scalar(scalar_tag(key), value, event.step)

    def on_preview(self, event: Preview) -> None:
        lines = [f"**{r['prompt'][-200:]!r}** -> {r['output']!r} `{r['scores']}`"
                 for r in event.records]
        self.writer.add_text("previews", "\n\n".join(lines), event.step)

    def on_alert(self, event: Alert) -> None:
        self.writer.add_scalar(f"alerts/{event.name}", 1.0 if event.state == "raised" else 0.0,
                               event.step)
        self.writer.add_text("alerts", f"{event.state} {event.level} {event.name}: "
                                       f"{event.message}", event.step)

    def on_end(self, event: RunEnd) -> None:
        if self.writer is not None:
            self.writer.add_text("outcome", _code({"state": event.state,
                                                   "reason": event.reason}),
                                 event.summary.get("steps_done", 0))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TrackioTracker(RunListener):
    """A Trackio run in project ``monitoring.trackio_project``, named after the output directory.

    Trackio is local-first: everything lands in ``$TRACKIO_DIR/<project>.db`` (SQLite; default
    ``~/.cache/huggingface/trackio``); ``trackio show`` opens its own dashboard. Its console
    messages are kept off stdout (they would corrupt ``trainer run --json``).
    """

    def __init__(self, project: str, run_name: str):
        self.trackio = _need("trackio", "trackio", "trackio")
        self.project = project
        self.run_name = run_name
        self.run: Any = None

    def _quietly(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            return fn(*args, **kwargs)

    def on_start(self, event: RunStart) -> None:
        self.run = self._quietly(
            self.trackio.init, project=self.project, name=self.run_name,
            config={"config": event.config, "manifest": event.manifest},
            resume="allow" if event.resumed else "never", embed=False,
            auto_log_gpu=False, auto_log_cpu=False)

    def on_step_end(self, event: StepEnd) -> None:
        if event.record is not None:
            self.run.log({scalar_tag(k): v for k, v in numeric_items(event.record).items()},
                         step=event.step)

    def on_alert(self, event: Alert) -> None:
        level = {"info": "info", "warning": "warn", "error": "error"}.get(event.level, "warn")
        title = f"{event.name} {event.state}"
        self._quietly(self.run.alert, title=title, text=event.message,
                      level=self.trackio.AlertLevel(level))

    def close(self) -> None:
        if self.run is not None:
            # trackio.finish() also forgets the run, else Trackio's atexit hook finishes it
            # again and prints to stdout after our output.
            try:
                self._quietly(self.trackio.finish)
            except RuntimeError:  # initialised on another thread: finish ours directly
                self._quietly(self.run.finish)
            self.run = None


def _code(data: Any) -> str:
    # TensorBoard renders text as markdown; indenting by four spaces keeps JSON verbatim.
    return "\n".join("    " + line for line in json.dumps(data, indent=2, default=str)
                     .splitlines())


# --------------------------------------------------------------------------- the plugin

#: Names this plugin accepts in ``environment.report_to``.
BUILTIN_TRACKERS = ("tensorboard", "trackio")


@hookimpl
def trackers() -> list[str]:
    return list(BUILTIN_TRACKERS)


@hookimpl
def run_listeners(config: Any, output_dir: Any) -> list[Any]:
    wanted = config.environment.report_to
    out: list[Any] = []
    if "tensorboard" in wanted:
        log_root = Path(config.output.logging_dir or output_dir)
        out.append(TensorBoardTracker(log_root / "tensorboard"))
    if "trackio" in wanted:
        out.append(TrackioTracker(config.monitoring.trackio_project,
                                  os.path.basename(os.path.abspath(output_dir))))
    return out
