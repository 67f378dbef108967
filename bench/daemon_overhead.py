"""Per-file overhead of ``trainer daemon`` on CPU (a script that prints numbers, not a test).

Starts a daemon on a fresh home, waits until its worker is loaded, then:

1. one at a time: submits a small file, waits until it is completed, 20 times. Per file, from
   the ledger's timestamps: *ready -> training start* (``submitted_at`` -> the worker's first
   step about to run: pick-up, validation, preprocessing) and *training end -> completed*
   (``trained_at``, last step and checkpoint written -> ``finished_at``: publish, ledger
   commit, report, move, retention);
2. a burst: 20 files at once; the wall time minus the training time, per file.

The model is the tests' micro Qwen3 (real 151,936-row vocabulary, 16-wide body), built in
code, so the numbers are the daemon's overhead more than training; ``--demo`` uses the embedded
tiny demo model instead (its checkpoints are ~230 MB: writing them dominates).

    PYTHONPATH=src python bench/daemon_overhead.py [--files 20] [--demo]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def micro_model(root: Path) -> Path:
    import torch
    import transformers

    from trainer_core.data.tokenizer import load_tokenizer
    from trainer_core.demo import tiny_model_config

    cfg = tiny_model_config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            max_position_embeddings=1024)
    torch.manual_seed(0)
    out = root / "micro-model"
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    load_tokenizer(None).save_pretrained(out)
    return out


def ledger_rows(home: Path, ids: list[int]) -> list[dict]:
    db = sqlite3.connect(f"file:{home / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        marks = ",".join("?" * len(ids))
        return [dict(r) for r in db.execute(f"SELECT * FROM files WHERE id IN ({marks})", ids)]
    finally:
        db.close()


def wait(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--rows", type=int, default=4, help="rows per file (2 per step)")
    ap.add_argument("--demo", action="store_true", help="the embedded tiny demo model")
    args = ap.parse_args()

    from trainer_core.config import resolve, to_dict
    from trainer_core.daemon.control import submit_files
    from trainer_core.daemon.home import Home
    from trainer_core.demo import sample_dataset_path

    tmp = Path(tempfile.mkdtemp(prefix="daemon-bench-"))
    settings = {"hyperparams.batch_size": 2, "hyperparams.max_length": 512,
                "hyperparams.learning_rate": 1e-3, "hyperparams.warmup_steps": 3,
                "monitoring.num_preview_samples": 0, "environment.device": "cpu",
                "daemon.poll_interval_s": 0.5, "daemon.settle_s": 0.0,
                "daemon.snapshot_time": None, "daemon.min_free_gb": 0.0}
    if not args.demo:
        settings["model.path"] = str(micro_model(tmp))
    home = Home(tmp / "home")
    home.root.mkdir()
    home.config.write_text(json.dumps(to_dict(resolve(cli=settings).config)), encoding="utf-8")
    lines = sample_dataset_path().read_text(encoding="utf-8").splitlines()
    n = args.rows
    files = []
    for i in range(2 * args.files):  # distinct content for both phases
        f = tmp / "files" / f"f{i:03d}.jsonl"
        f.parent.mkdir(exist_ok=True)
        chunk = [lines[(i * n + k) % len(lines)] for k in range(n)]
        f.write_text("\n".join(chunk) + "\n", encoding="utf-8")
        files.append(f)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    t_start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "trainer_core", "daemon", "start", "--home",
                             str(home.root)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "daemon.err", "wb"), env=env)  # noqa: SIM115

    def status() -> dict:
        try:
            return json.loads(home.status.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    try:
        wait(lambda: (status().get("worker") or {}).get("state") == "idle"
             and (status().get("model") or {}).get("checkpoint"), 300, "the worker")
        t_ready = time.time() - t_start

        def done(ids: list[int]) -> bool:
            rows = ledger_rows(home.root, ids)
            return all(r["state"] == "completed" and r["finished_at"] for r in rows)

        seq_ids = []
        for f in files[: args.files]:
            fid = submit_files(home, [f], "normal", False)[0]["id"]
            seq_ids.append(fid)
            wait(lambda fid=fid: done([fid]), 300, f"file {fid}")
        rows = ledger_rows(home.root, seq_ids)
        t_in = [r["train_started_at"] - r["submitted_at"] for r in rows]
        t_out = [r["finished_at"] - r["trained_at"] for r in rows]
        t_train = [r["trained_at"] - r["train_started_at"] for r in rows]

        t0 = time.time()
        burst = [r["id"] for r in submit_files(home, files[args.files:], "normal", False)]
        wait(lambda: done(burst), 600, "the burst")
        wall = time.time() - t0
        brows = ledger_rows(home.root, burst)
        b_train = sum(r["trained_at"] - r["train_started_at"] for r in brows)
    finally:
        subprocess.run([sys.executable, "-m", "trainer_core", "daemon", "stop", "--home",
                        str(home.root)], env=env, capture_output=True)
        proc.wait(120)

    def ms(xs: list[float]) -> str:
        return (f"median {1000 * statistics.median(xs):.0f} ms, mean "
                f"{1000 * statistics.mean(xs):.0f} ms, max {1000 * max(xs):.0f} ms")

    steps = sum(r["steps"] for r in rows)
    print(f"model: {'tiny demo' if args.demo else 'micro'}; {args.files} files of {n} rows "
          f"({steps} steps in phase 1); home {home.root}")
    print(f"daemon start -> worker loaded and step-0 checkpoint: {t_ready:.1f} s")
    print(f"one at a time, ready -> training start: {ms(t_in)}")
    print(f"one at a time, training end -> completed: {ms(t_out)}")
    print(f"one at a time, training itself (steps + final checkpoint): {ms(t_train)}")
    print(f"burst of {len(burst)}: {wall:.1f} s wall, {b_train:.1f} s training, overhead "
          f"{1000 * (wall - b_train) / len(burst):.0f} ms per file")


if __name__ == "__main__":
    main()
