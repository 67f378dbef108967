"""CLI startup time: ``trainer --help`` and ``trainer profiles`` against ``python -c pass``.

    python bench/cli_startup.py [--runs 15]

Runs the ``trainer`` console script installed next to ``sys.executable`` (the one a user
runs), each command ``--runs`` times in a fresh process, and prints median/min/max wall time.
Goal: the trainer commands stay at or under 0.5 s (they must not import torch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL_S = 0.5


def trainer_script() -> str:
    bindir = Path(sys.executable).parent
    for name in ("trainer", "trainer.exe"):
        candidate = bindir / name
        if candidate.exists():
            return str(candidate)
    raise SystemExit(f"no `trainer` console script next to {sys.executable}; "
                     "pip install -e . first")


def time_command(argv: list[str], runs: int) -> list[float]:
    env = dict(os.environ)
    subprocess.run(argv, capture_output=True, env=env, check=True)  # warm the file cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                       check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="Runs per command (>= 10).")
    args = parser.parse_args()
    runs = max(args.runs, 10)
    trainer = trainer_script()
    commands = [
        ("python -c pass (baseline)", [sys.executable, "-c", "pass"], False),
        ("trainer --help", [trainer, "--help"], True),
        ("trainer profiles", [trainer, "profiles"], True),
    ]
    print(f"{runs} runs each; python {sys.version.split()[0]}; {trainer}")
    print(f"TRAINER_PLUGINS={os.environ.get('TRAINER_PLUGINS', '(unset)')}")
    header = f"{'command':<28} {'median s':>9} {'min s':>7} {'max s':>7} {'over base':>10}  goal"
    print(header)
    print("-" * len(header))
    base = None
    ok = True
    for label, argv, has_goal in commands:
        t = time_command(argv, runs)
        median = statistics.median(t)
        if base is None:
            base = median
        goal = ""
        if has_goal:
            passed = median <= GOAL_S
            ok &= passed
            goal = f"{'ok' if passed else 'SLOW'} (<= {GOAL_S} s)"
        print(f"{label:<28} {median:>9.3f} {min(t):>7.3f} {max(t):>7.3f} "
              f"{median - base:>+10.3f}  {goal}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
