"""Overhead of trackers and alerts on the demo run: with vs without.

Runs the embedded demo (``trainer run --profile emoji_think``, the tiny model on the bundled
data) twice, each in a fresh process:

* ``off``: ``environment.report_to=[]``, ``monitoring.alerts=false``;
* ``on``:  ``report_to=["tensorboard", "trackio"]``, alerts on.

Two numbers per run: the wall time of the training loop (``train_time_s``, noisy on a shared
machine) and, measured directly, the time the training thread spent inside each listener's
callbacks (every ``RunEvents`` emission is timed per listener). The overhead reported is the
tracker + alert listeners' time per step as a fraction of the mean step time; the goal is < 2%.
It also counts the alerts the demo run raised (the demo must stay quiet).

    python bench/monitor_overhead.py [--max-steps N]

Needs ``pip install 'trainer-core[tensorboard,trackio]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

WATCHED = ("AlertsListener", "TensorBoardTracker", "TrackioTracker", "PlotListener")


def child(out: Path, on: bool, max_steps: int | None) -> dict:
    from trainer_core.config import resolve
    from trainer_core.demo import DEMO_HYPERPARAMS
    from trainer_core.monitor import events as ev
    from trainer_core.train.recipe import run_training

    spent: dict[str, float] = defaultdict(float)

    def timed_emit(self, method, event):
        with self._lock:
            for listener in self.listeners:
                t = time.perf_counter()
                getattr(listener, method)(event)
                spent[type(listener).__name__] += time.perf_counter() - t

    ev.RunEvents._emit = timed_emit
    cli = {"profile.name": "emoji_think", "output.output_dir": str(out),
           "environment.report_to": ["tensorboard", "trackio"] if on else [],
           "monitoring.alerts": on}
    if max_steps:
        cli["hyperparams.max_steps"] = max_steps
    summary = run_training(resolve(cli=cli, preset=DEMO_HYPERPARAMS), quiet=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    alerts = [r for r in map(json.loads, lines) if "alert" in r]
    return {"steps": summary["steps_done"], "train_time_s": summary["train_time_s"],
            "state": summary["state"], "listener_s": dict(spent), "alerts": alerts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-steps", type=int, default=None, help="default: the whole demo")
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.out), args.child == "on", args.max_steps)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TRACKIO_DIR": str(Path(tmp) / "trackio")}
        for mode in ("off", "on"):
            cmd = [sys.executable, __file__, "--child", mode, "--out", str(Path(tmp) / mode)]
            if args.max_steps:
                cmd += ["--max-steps", str(args.max_steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    on, off = results["on"], results["off"]
    step_s = on["train_time_s"] / on["steps"]
    watched = {k: v for k, v in on["listener_s"].items() if k in WATCHED}
    per_step = sum(watched.values()) / on["steps"]
    print(f"demo run, {on['steps']} steps, {os.cpu_count()} CPUs")
    print(f"  train loop without trackers/alerts: {off['train_time_s']:.1f} s "
          f"({off['train_time_s'] / off['steps'] * 1000:.1f} ms/step)")
    print(f"  train loop with tensorboard+trackio+alerts: {on['train_time_s']:.1f} s "
          f"({step_s * 1000:.1f} ms/step)  end-to-end difference "
          f"{(on['train_time_s'] / off['train_time_s'] - 1) * 100:+.1f}% (includes noise)")
    for name, secs in sorted(watched.items()):
        print(f"  {name:<20} {secs / on['steps'] * 1e3:8.3f} ms/step")
    print(f"  trackers + alerts + plot, measured in the training thread: {per_step * 1e3:.3f} ms/step "
          f"= {100 * per_step / step_s:.2f}% of step time (goal < 2%)")
    print(f"  alerts raised on the demo run: {len(on['alerts'])} "
          + (json.dumps(on["alerts"]) if on["alerts"] else "(quiet)"))


if __name__ == "__main__":
    main()
