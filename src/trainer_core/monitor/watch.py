"""``trainer watch``: a live terminal view of a run (or a folder of runs), built from its files.

Everything is read from ``status.json``, ``metrics.jsonl`` and ``previews.jsonl``, so it works
over SSH, from another machine sharing the disk, and on finished runs. :func:`render` returns
the view as a string (tests and ``--once`` print it); :func:`watch` redraws it until the runs
stop (or Ctrl-C).

Views are looked up in :data:`VIEWS` (first match wins): a daemon home (its ``status.json``
says ``"kind": "trainer-daemon"``), a single run directory, or a folder that holds run
directories; ``register_view`` puts another first.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer_core.files import (
    DAEMON_LOG_DIR,
    METRICS_FILE,
    PREVIEWS_FILE,
    RUN_MANIFEST,
    STATUS_FILE,
)
from trainer_core.monitor.plot import read_metrics
from trainer_core.monitor.progress import format_duration
from trainer_core.monitor.status import read_status

#: Files a run writes while it trains: a folder with one of them can be watched, and the
#: newest of them dates the run.
WATCHABLE_FILES = (STATUS_FILE, METRICS_FILE, RUN_MANIFEST)
SPARK = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-~=^*#"
CLEAR = "\x1b[H\x1b[2J"


def is_run_dir(path: Path) -> bool:
    """A training run's directory (a daemon home, whose status.json names its ``kind``, is
    not one: its own view shows it)."""
    if not (path.is_dir() and any((path / m).exists() for m in WATCHABLE_FILES)):
        return False
    try:
        status = json.loads((path / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not (isinstance(status, dict) and status.get("kind", "run") != "run")


def find_runs(root: Path, depth: int = 2) -> list[Path]:
    """Run directories at or below ``root`` (``depth`` levels), most recently updated first."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    level = [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                # A symlink to a folder inside root (runs/latest) points at a run listed under
                # its own name; one that leaves root is kept, for the caller to judge (the
                # dashboard lists it as skipped).
                children = sorted(p for p in d.iterdir() if p.is_dir()
                                  and not p.name.startswith(".")
                                  and not (p.is_symlink() and _inside(p, root)))
            except OSError:
                continue
            for c in children:
                if is_run_dir(c):
                    found.append(c)
                elif c.name != "checkpoints":
                    nxt.append(c)
        level = nxt
    return sorted(found, key=_updated, reverse=True)


def _inside(path: Path, root: Path) -> bool:
    resolved, top = path.resolve(), root.resolve()
    return resolved == top or top in resolved.parents


def _updated(run: Path) -> float:
    times = [(run / m).stat().st_mtime for m in WATCHABLE_FILES if (run / m).exists()]
    return max(times, default=0.0)


def sparkline(values: list[float], width: int, ascii_only: bool = False) -> str:
    """The last ``width`` values as block characters scaled between their min and max."""
    chars = SPARK_ASCII if ascii_only else SPARK
    vals = [v for v in values if math.isfinite(v)][-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    return "".join(chars[min(int((v - lo) / span * (len(chars) - 1) + 0.5), len(chars) - 1)]
                   for v in vals)


def read_previews(run: Path, last: int = 4) -> list[dict[str, Any]]:
    """The generations of the latest preview step (at most ``last``)."""
    try:
        lines = (run / PREVIEWS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    recs = []
    for line in lines[-64:]:
        try:
            recs.append(json.loads(line))
        except ValueError:
            continue
    if not recs:
        return []
    step = recs[-1].get("step")
    return [r for r in recs if r.get("step") == step][-last:]


def _num(v: Any, spec: str, none: str = "-") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else none


def _loss_sparkline(steps: list[dict[str, Any]], width: int, ascii_only: bool) -> list[str]:
    """The recent training losses as one sparkline line with their range (none without losses)."""
    losses = [r["loss"] for r in steps if isinstance(r.get("loss"), (int, float))]
    if not losses:
        return []
    span = max(width - 30, 10)
    shown = losses[-span:]
    return [f"  loss {sparkline(shown, span, ascii_only)}  "
            f"{_num(max(shown), '.3g')}..{_num(min(shown), '.3g')}"]


def _bar(step: int, total: int, width: int = 24) -> str:
    filled = int(width * step / max(total, 1))
    return "#" * filled + "-" * (width - filled)


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def question_start(prompt: str, width: int = 40) -> str:
    """The start of a preview's question on one line, with an ellipsis when cut (profiles add
    their instructions at the end, so the start is what tells questions apart)."""
    return _clip(" ".join(prompt.split()), width)


def render_run(run: Path, width: int = 100, now: float | None = None,
               ascii_only: bool = False) -> str:
    """One run: progress, latest numbers, loss sparkline, alerts, latest previews."""
    run = Path(run)
    status = read_status(run, now) or {}
    steps, alert_log = read_metrics(run / METRICS_FILE)
    state = status.get("state", "unknown")
    if state == "running" and status.get("process_alive") is False:
        state = "running (process gone)"
    elif state == "running" and status.get("stalled"):
        state = "running (stalled)"
    step, total = status.get("step") or 0, status.get("total_steps") or 0
    lines = [f"run {run.name}  [{state}]  {run}"]
    if total:
        lines.append(f"  [{_bar(step, total)}] {step}/{total} "
                     f"({100 * step / total:.0f}%)  ETA "
                     f"{format_duration(status.get('eta_s', float('inf')) or 0.0)}")
    last = steps[-1] if steps else {}
    first_loss = next((r["loss"] for r in steps if "loss" in r), None)
    eval_loss = next((r["eval_loss"] for r in reversed(steps) if "eval_loss" in r),
                     status.get("eval_loss"))
    lines.append(f"  loss {_num(status.get('loss', last.get('loss')), '.4f')}"
                 f" (first {_num(first_loss, '.4f')})  eval {_num(eval_loss, '.4f')}  "
                 f"lr {_num(status.get('lr', last.get('lr')), '.2e')}  "
                 f"{_num(status.get('tokens_per_s', last.get('tokens_per_s')), ',.0f')} tok/s  "
                 f"trained {_num(status.get('tokens_trained', last.get('tokens_trained')), ',')}"
                 " tokens")
    lines.extend(_loss_sparkline(steps, width, ascii_only))
    evals = [r["eval_loss"] for r in steps if isinstance(r.get("eval_loss"), (int, float))]
    if len(evals) > 1:
        lines.append(f"  eval {sparkline(evals, max(width - 30, 10), ascii_only)}")
    active = status.get("alerts") or []
    if active:
        lines.append("  alerts:")
        for a in active:
            lines.append(_clip(f"    ! {a.get('level', 'warning')} {a.get('alert')} "
                               f"(step {a.get('step')}): {a.get('message', '')}", width))
    elif alert_log:
        lines.append(f"  alerts: none active ({len(alert_log)} changes logged)")
    else:
        lines.append("  alerts: none")
    previews = read_previews(run)
    if previews:
        lines.append(f"  previews at step {previews[0].get('step')}:")
        for p in previews:
            scores = " ".join(f"{k}={_num(v, '.2g', str(v))}"
                              for k, v in (p.get("scores") or {}).items())
            ref = p.get("reference")
            lines.append(_clip(f"    {question_start(p.get('prompt') or '')!r} -> "
                               f"{p.get('output', '')!r}"
                               + (f" (reference {ref!r})" if ref is not None else "")
                               + (f"  [{scores}]" if scores else ""), width))
    return "\n".join(lines)


def render_runs(root: Path, runs: list[Path], width: int = 100, now: float | None = None,
                ascii_only: bool = False) -> str:
    """A folder of runs: one line each, then the detail of the newest."""
    lines = [f"{len(runs)} runs in {root}"]
    for r in runs[:20]:
        s = read_status(r, now) or {}
        alerts = len(s.get("alerts") or [])
        lines.append(_clip(f"  {r.name:<32} {s.get('state', '?'):<12} "
                           f"{s.get('step', '-')}/{s.get('total_steps', '-'):<8} "
                           f"loss {_num(s.get('loss'), '.4f')}"
                           + (f"  {alerts} alert(s)" if alerts else ""), width))
    lines += ["", render_run(runs[0], width, now, ascii_only)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- a daemon home

DAEMON_KIND = "trainer-daemon"


def _daemon_status(home: Path) -> dict[str, Any] | None:
    try:
        status = json.loads((home / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and status.get("kind") == DAEMON_KIND else None


def is_daemon_home(path: Path) -> bool:
    return _daemon_status(path) is not None


def render_daemon(home: Path, width: int = 100, now: float | None = None,
                  ascii_only: bool = False) -> str:
    """A daemon home, from its ``status.json`` (kind ``trainer-daemon``) and
    ``logs/metrics.jsonl``: state, the file in training, recent losses, queue, last results."""
    from trainer_core.monitor.status import pid_alive

    s = _daemon_status(home) or {}
    now = time.time() if now is None else now
    state = s.get("state", "?")
    if s.get("paused"):
        state += ", paused"
    if pid_alive(s.get("pid")) is False:
        state += ", process gone"
    updated = s.get("updated_at")
    age = f"  updated {now - updated:.0f} s ago" if isinstance(updated, (int, float)) else ""
    model = s.get("model") or {}
    lines = [f"daemon {home}  [{state}]  model step {model.get('step', '-')}{age}"]
    cur = s.get("current")
    if cur:
        fs, ft = cur.get("file_step") or 0, cur.get("file_steps") or 0
        lines.append(_clip(f"  training #{cur.get('id')} {cur.get('name')} "
                           f"({cur.get('priority')}, attempt {cur.get('attempt')})  "
                           f"[{_bar(fs, ft)}] {fs}/{ft}  loss {_num(cur.get('loss'), '.4f')}  "
                           f"lr {_num(cur.get('lr'), '.2e')}", width))
    else:
        lines.append("  training: nothing")
    steps, _ = read_metrics(home / DAEMON_LOG_DIR / METRICS_FILE)
    lines.extend(_loss_sparkline(steps, width, ascii_only))
    q = s.get("queue") or {}
    by = q.get("by_priority") or {}
    lines.append(f"  queue {q.get('total', 0)}"
                 + (" (" + ", ".join(f"{k} {v}" for k, v in by.items() if v) + ")"
                    if any(by.values()) else ""))
    for f in (q.get("next") or [])[:5]:
        lines.append(_clip(f"    next #{f.get('id')} {f.get('name')} ({f.get('priority')})",
                           width))
    for f in (s.get("last") or [])[:5]:
        mark = {"completed": "ok", "failed": "FAILED", "skipped": "skipped"}.get(
            f.get("state"), f.get("state"))
        detail = (f"error: {f.get('error')}" if f.get("error") else
                  f"{f.get('steps')} steps, loss {_num(f.get('loss_end'), '.4f')}")
        lines.append(_clip(f"    {mark:<8} #{f.get('id')} {f.get('name')}  {detail}", width))
    rates, disk = s.get("rates") or {}, s.get("disk") or {}
    lines.append(f"  {_num(rates.get('tokens_per_s'), ',.0f')} tok/s, "
                 f"{rates.get('files_last_hour', 0)} files in the last hour; disk "
                 f"{_num(disk.get('free_gb'), '.1f')} GB free ({disk.get('gate', '?')})")
    return "\n".join(lines)


def _daemon_running(home: Path) -> bool:
    from trainer_core.monitor.status import pid_alive

    s = _daemon_status(home) or {}
    return s.get("state") not in (None, "stopped") and pid_alive(s.get("pid")) is not False


# --------------------------------------------------------------------------- views

#: (matches(dir), render(dir, width, now, ascii_only) -> str, running(dir) -> bool)
View = tuple[Callable[[Path], bool], Callable[..., str], Callable[[Path], bool]]


def _running(d: Path) -> bool:
    """Whether any run under ``d`` is still going (a run whose process is gone is not)."""
    for r in find_runs(d)[:20]:
        s = read_status(r) or {}
        if s.get("state") == "running" and s.get("process_alive") is not False:
            return True
    return False


def _render_dir(d: Path, width: int = 100, now: float | None = None,
                ascii_only: bool = False) -> str:
    runs = find_runs(d)
    if not runs:
        return f"no runs in {d} yet (waiting for status.json or metrics.jsonl)"
    if runs == [d]:
        return render_run(d, width, now, ascii_only)
    return render_runs(d, runs, width, now, ascii_only)


VIEWS: list[View] = [(is_daemon_home, render_daemon, _daemon_running),
                     (lambda d: True, _render_dir, _running)]


def register_view(view: View) -> None:
    """Put a view first (a daemon home registers one that recognises its layout)."""
    VIEWS.insert(0, view)


def _view(d: Path) -> View:
    return next(v for v in VIEWS if v[0](d))


def render(directory: Path, width: int | None = None, now: float | None = None,
           ascii_only: bool | None = None) -> str:
    """The view of ``directory`` as text."""
    width = width or shutil.get_terminal_size((100, 30)).columns
    if ascii_only is None:
        ascii_only = "utf" not in (getattr(sys.stdout, "encoding", "") or "").lower()
    return _view(Path(directory))[1](Path(directory), width, now, ascii_only)


def watch(directory: Path, interval: float = 2.0, once: bool = False, follow: bool = False,
          stream: Any = None, ascii_only: bool | None = None) -> None:
    """Redraw the view every ``interval`` s; stop when nothing runs any more (unless
    ``follow``), or after one frame with ``once``."""
    stream = stream or sys.stdout
    tty = stream.isatty()
    d = Path(directory)
    while True:
        text = render(d, ascii_only=ascii_only)
        stream.write((CLEAR if tty and not once else "") + text + "\n")
        stream.flush()
        if once or (not follow and not _view(d)[2](d) and find_runs(d)):
            return
        if not tty:
            stream.write("\n")
        time.sleep(interval)
