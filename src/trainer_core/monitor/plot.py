"""A run's loss plot as a self-contained SVG (no plotting library): ``loss.svg``.

Three panels share the step axis: train and eval loss, learning rate, tokens/s. The run writes
it at each evaluation and at the end (:class:`PlotListener`); ``trainer plot RUN_DIR...``
overlays several runs (:func:`plot_runs`). Data come from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

from trainer_core.files import METRICS_FILE
from trainer_core.monitor.events import RunEnd, RunListener, RunStart, StepEnd

PLOT_FILE = "loss.svg"
#: One colour per overlaid run (colour-blind-safe palette).
COLORS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000")

Series = list[tuple[float, float]]


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, alert records) of a ``metrics.jsonl``; unreadable lines are skipped
    (a line being appended while we read is incomplete)."""
    steps: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return steps, alerts
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            (alerts if "alert" in rec else steps).append(rec)
    return steps, alerts


def series(records: list[dict[str, Any]], key: str) -> Series:
    """(step, value) for every record with a finite number under ``key``."""
    out = []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((float(r["step"]), float(v)))
    return out


def nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 10000:
        return f"{v / 1000:.0f}k"
    if a >= 100:
        return f"{v:.0f}"
    if a < 0.01:
        return f"{v:.0e}"
    return f"{v:.3g}"


def panel(x0: float, y0: float, w: float, h: float, title: str,
          lines: list[tuple[Series, str, str]], xmax: float) -> list[str]:
    """One chart: axes, ticks and polylines; ``lines`` are (points, colour, dash)."""
    out = [f'<text x="{x0}" y="{y0 - 6}" class="t">{escape(title)}</text>',
           f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" class="frame"/>']
    ys = [v for pts, _, _ in lines for _, v in pts]
    if not ys:
        out.append(f'<text x="{x0 + w / 2}" y="{y0 + h / 2}" class="empty">no data yet</text>')
        return out
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad

    def px(s: float) -> float:
        return x0 + w * s / max(xmax, 1)

    def py(v: float) -> float:
        return y0 + h - h * (v - lo) / (hi - lo)

    for t in nice_ticks(lo, hi):
        y = py(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{x0 - 4}" y="{y + 3:.1f}" class="yl">{fmt(t)}</text>')
    for t in nice_ticks(0, xmax, 6):
        out.append(f'<text x="{px(t):.1f}" y="{y0 + h + 12}" class="xl">{fmt(t)}</text>')
    for pts, color, dash in lines:
        if not pts:
            continue
        coords = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" '
                   f'stroke-width="1.5"{dash_attr}/>')
        if len(pts) <= 2 or dash:  # few points (eval): mark them
            out += [f'<circle cx="{px(s):.1f}" cy="{py(v):.1f}" r="2.5" fill="{color}"/>'
                    for s, v in pts]
    return out


def render_svg(runs: list[tuple[str, list[dict[str, Any]]]], title: str = "") -> str:
    """The three-panel SVG of one or more runs: ``runs`` is [(label, step records)]."""
    width, left, right = 760, 60, 20
    ph, gap, top = 150, 46, 40
    legend_h = 18 * len(runs)
    height = top + 3 * (ph + gap) + legend_h
    w = width - left - right
    xmax = max((r["step"] for _, recs in runs for r in recs), default=1)
    colored = [(label, recs, COLORS[i % len(COLORS)]) for i, (label, recs) in enumerate(runs)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             "<style>.t{font-weight:bold;font-size:12px}.frame{fill:none;stroke:#999}"
             ".grid{stroke:#e5e5e5}.yl{text-anchor:end;fill:#555}.xl{text-anchor:middle;"
             "fill:#555}.empty{text-anchor:middle;fill:#999}</style>",
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="18" class="t">{escape(title or "training")}</text>']
    loss_lines = []
    for _, recs, color in colored:
        loss_lines.append((series(recs, "loss"), color, ""))
        loss_lines.append((series(recs, "eval_loss"), color, "5,3"))
    panels = [("loss (solid: train, dashed: eval)", loss_lines),
              ("learning rate", [(series(recs, "lr"), c, "") for _, recs, c in colored]),
              ("tokens/s", [(series(recs, "tokens_per_s"), c, "") for _, recs, c in colored])]
    for i, (name, lines) in enumerate(panels):
        parts += panel(left, top + i * (ph + gap), w, ph, name, lines, xmax)
    ly = top + 3 * (ph + gap) - gap + 24
    for i, (label, _, color) in enumerate(colored):
        y = ly + 18 * i
        parts.append(f'<line x1="{left}" y1="{y - 4}" x2="{left + 24}" y2="{y - 4}" '
                     f'stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{left + 30}" y="{y}">{escape(label)}</text>')
    parts.append(f'<text x="{width - right}" y="{ly}" text-anchor="end" fill="#555">step</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_svg(path: Path, svg: str) -> None:
    """Atomically (temp + rename): a browser or viewer never sees half a plot."""
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(svg, encoding="utf-8")
    os.replace(tmp, path)


def plot_runs(run_dirs: list[Path], out: Path, title: str = "") -> Path:
    """Overlay the runs' ``metrics.jsonl`` in one SVG at ``out``."""
    from trainer_core.errors import UserError

    runs = []
    seen: set[Path] = set()
    # runs/latest (a symlink) is the run it points at: `trainer plot runs/*` draws each run
    # once, under its own name.
    for d in sorted(map(Path, run_dirs), key=lambda d: d.is_symlink()):
        metrics = d / METRICS_FILE
        if not metrics.exists():
            raise UserError(f"{d}: no metrics.jsonl (is it a run directory?)")
        real = d.resolve()
        if real in seen:
            continue
        seen.add(real)
        runs.append(((real.name if d.is_symlink() else d.name) or str(d),
                     read_metrics(metrics)[0]))
    write_svg(out, render_svg(runs, title))
    return out


class PlotListener(RunListener):
    """Writes ``loss.svg`` after each evaluation and at the end of the run.

    Keeps the run's records in memory; a resumed run starts from the ``metrics.jsonl`` records up
    to its checkpoint's step.
    """

    def __init__(self, path: Path, metrics_path: Path):
        self.path = path
        self.metrics_path = metrics_path
        self.records: list[dict[str, Any]] = []
        self.title = path.parent.name

    def on_start(self, event: RunStart) -> None:
        if event.resumed:
            steps, _ = read_metrics(self.metrics_path)
            self.records = [r for r in steps if r["step"] <= event.start_step]

    def on_step_end(self, event: StepEnd) -> None:
        if event.record is None:
            return
        self.records.append(event.record)
        if "eval_loss" in event.record:
            self.write()

    def on_end(self, event: RunEnd) -> None:
        if self.records:
            self.write()

    def write(self) -> None:
        write_svg(self.path, render_svg([(self.title, self.records)], self.title))
