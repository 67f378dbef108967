"""Whole-run efficiency of a real ``trainer run`` on a GPU: tokens/s over the whole training time
against the loop's steady-state rate, with evaluation and checkpoints on.

    python bench/whole_run.py --out DIR [--steps 3000] [--eval-steps 200] [--save-steps 500]
        [--set KEY=VALUE ...]

Model: the Qwen3-0.6B shape of bench/throughput.py (random init) with the bundled Qwen3
tokenizer. Data: synthetic chat rows (a question and an answer of random words, answer
lengths lognormal around ~300 tokens), ``--steps x 8`` of them plus a small validation split,
written as JSONL and preprocessed by the run itself. ``trainer run``'s defaults otherwise
(8 examples per step, CUDA graphs, background checkpoints); previews off.

Printed: time to the first step, the whole-run rate (run.json: tokens seen / training time,
which includes compilation, evaluations and checkpoints), the steady-state rate (median of the
``environment.logging_steps`` windows that hold no evaluation and no checkpoint), their ratio
(goal >= 0.85), the slowest windows, and the windows that paid for a checkpoint or an
evaluation (the one after the step that ran it).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("alpha beta gamma delta the of and to in is what how many convert capital city number "
         "sum product kilometres metres grams hours minutes answer river mountain model data "
         "train loss step token graph kernel memory").split()


def make_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60)))
            a_len = int(min(1500, max(10, rng.lognormvariate(5.4, 0.8))))
            a = " ".join(rng.choice(WORDS) for _ in range(a_len))
            fh.write(json.dumps({"messages": [{"role": "user", "content": q + "?"},
                                              {"role": "assistant", "content": a + "."}]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir", default="/tmp/qwen3-0.6b-shape-tok")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-steps", type=int, default=200)
    ap.add_argument("--save-steps", type=int, default=500)
    ap.add_argument("--logging-steps", type=int, default=50)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--warm-cache", action="store_true",
                    help="first a 40-step run of the same shape, so the measured run starts "
                         "with torch.compile's cache warm (as any run after the first does)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import ensure_model

    from trainer_core.data.tokenizer import load_tokenizer

    model = ensure_model(Path(args.model_dir))
    load_tokenizer(None).save_pretrained(model)
    data = out / "rows.jsonl"
    val_rows = 160
    make_rows(data, args.steps * 8 + val_rows)
    run_dir = out / "run"
    cmd = [sys.executable, "-m", "trainer_core", "run", "--model", str(model), "--dataset",
           str(data), "--output-dir", str(run_dir), "--overwrite", "--max-steps",
           str(args.steps), "--save-steps", str(args.save_steps),
           "--set", f"hyperparams.eval_steps={args.eval_steps}",
           "--set", f"data.validation_split={val_rows / (args.steps * 8 + val_rows):.6f}",
           "--set", "monitoring.num_preview_samples=0",
           "--set", f"environment.logging_steps={args.logging_steps}", "--quiet"]
    for s in args.sets:
        cmd += ["--set", s]
    if args.warm_cache:
        warm = [*cmd, "--max-steps", "40", "--output-dir", str(out / "warm-up")]
        t0 = time.time()
        subprocess.run(warm, check=True)
        print(f"warm-up run: {time.time() - t0:.1f} s", flush=True)
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd)
    wall = time.time() - t0
    run = json.loads((run_dir / "run.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m and "tokens_per_s" in m]
    every = args.logging_steps

    def holds(m: dict, n: int) -> bool:
        # An evaluation or checkpoint runs after its step's metrics line is written, so its time
        # lands in the next window: window (step-every, step] pays for a multiple of n in
        # [step-every, step-1].
        return n > 0 and ((m["step"] - 1) // n) > ((m["step"] - every - 1) // n)

    quiet = [m["tokens_per_s"] for m in steps[1:]
             if not holds(m, args.eval_steps) and not holds(m, args.save_steps)]
    steady = statistics.median(quiet)
    whole = run["tokens_per_s"]
    first = steps[0]
    report = {
        "rc": proc.returncode, "state": run["state"], "steps": run["steps_done"],
        "wall_s": round(wall, 1), "train_time_s": run["train_time_s"],
        "tokens_seen": run["tokens_seen"], "whole_run_tok_s": whole,
        "steady_tok_s": round(steady, 1), "efficiency": round(whole / steady, 4),
        "first_window_tok_s": round(first["tokens_per_s"], 1),
        "eval_windows_tok_s": [round(m["tokens_per_s"]) for m in steps
                               if holds(m, args.eval_steps)][:8],
        "checkpoint_windows_tok_s": [round(m["tokens_per_s"]) for m in steps
                                     if holds(m, args.save_steps)],
        "slowest_windows": sorted((round(m["tokens_per_s"]), m["step"]) for m in steps)[:6],
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        if (run_dir / "checkpoints").exists() else [],
        "eval_loss": run.get("eval_loss"), "loss_start": run.get("loss_start"),
        "loss_end": run.get("loss_end"), "sets": args.sets, "warm_cache": args.warm_cache,
    }
    (out / "whole_run.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
