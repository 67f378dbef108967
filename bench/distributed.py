"""Multi-GPU scaling: trainer's engine on 1, 2, 4 GPUs, DDP and FSDP2, in one call per machine.

Model and data are bench/throughput.py's: Qwen3-0.6B shape (random init, float32 master
weights, bf16 autocast), synthetic examples with lognormal lengths (median 400). Each GPU gets
``--per-gpu`` (64) examples per optimizer step, so N GPUs train ``64 * N`` examples per step:
config ``batch_size=64, gradient_accumulation=N``, packed micro-batches of at most
``--max-tokens`` tokens. Every run draws from the same example pool in the same order
(``data.shuffle=false``): step k of an N-GPU run holds examples ``[64Nk, 64N(k+1))``.

Runs (each its own torchrun job, one after another; the 1-GPU one is a plain process):
  1 GPU                     the baseline: 64 examples per step
  N GPUs, ddp / fsdp        64 * N examples per step, split across ranks by tokens
  1 GPU, accumulation N     ("ref-N") the same global steps as the N-GPU runs on one GPU, for
                            the loss comparison; run side by side on separate GPUs, not timed

Reported per run, over the steps after ``--warmup``: non-padding tokens/s (all GPUs), tokens/s
per GPU, scaling efficiency (tok/s per GPU over the 1-GPU run's), median step time, peak memory
allocated per GPU (the largest rank), and each step's loss; "loss vs ref" is the largest
relative difference from the 1-GPU run with the same global steps.

    python bench/distributed.py --out DIR [--gpus 1,2,4] [--strategies ddp,fsdp] [--steps 40]
        [--warmup 15] [--max-tokens 40960] [--time-limit 420]

Each job has a hard time limit (what is left of ``--time-limit``); a job that runs over or
fails is reported as such and the rest carry on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import LR, ensure_model, make_examples, versions  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One run (under torchrun for N > 1): the engine's prepare_training / train_step."""
    import torch

    from trainer_core.config import load_config
    from trainer_core.data.batching import count_trained, micro_batches, plan_steps
    from trainer_core.train import step as engine
    from trainer_core.train.distributed import distributed_session
    from trainer_core.train.inputs import token_budget

    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = args.accum
    cfg = load_config(overrides={
        "model.path": args.model_dir,
        "hyperparams.batch_size": args.per_gpu,
        "hyperparams.gradient_accumulation": accum,
        "hyperparams.learning_rate": LR,
        "hyperparams.lr_scheduler": "constant",
        "hyperparams.warmup_steps": 0,
        "hyperparams.max_steps": args.steps,
        "data.shuffle": False,
        "data.max_tokens_per_batch": args.max_tokens,
        "environment.distributed": args.strategy,
    })
    hp = cfg.hyperparams
    pool = make_examples(args.steps * args.per_gpu * args.max_gpus, seed=0)
    plan = plan_steps(len(pool), hp.batch_size * hp.gradient_accumulation, hp.num_epochs,
                      hp.max_steps, cfg.data.seed, cfg.data.shuffle)
    with distributed_session(cfg) as dist:
        rank = dist.rank if dist else 0
        setup = engine.prepare_training(cfg, Path(args.model_dir), plan.total_steps,
                                        parallel=dist)
        budget = token_budget(cfg)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        losses, times, tokens, micro = [], [], [], []
        t_prev = time.time()
        for step in range(plan.total_steps):
            examples = [pool[i] for i in plan.step_indices(step)]
            if dist is not None:
                batches, n_trained = dist.step_share(examples, cfg, budget, 151_643,
                                                     setup.speed.pad_to_multiple)
            else:
                batches = micro_batches(examples, True, hp.batch_size, budget, 151_643,
                                        setup.speed.pad_to_multiple)
                n_trained = count_trained(batches)
            loss, grad_norm, _ = engine.train_step(setup, batches, n_trained, hp.max_grad_norm)
            if cuda:
                torch.cuda.synchronize()
            now = time.time()
            times.append(now - t_prev)
            t_prev = now
            losses.append(loss)
            tokens.append(sum(len(e["input_ids"]) for e in examples))
            micro.append(len(batches))
            if rank == 0 and (step < 3 or (step + 1) % 5 == 0):
                print(f"  [{args.name}] step {step + 1}: loss {loss:.4f} "
                      f"{1e3 * times[-1]:.0f} ms", flush=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        peaks = [peak]
        if dist is not None:
            vec = [0.0] * dist.world
            vec[dist.rank] = peak
            peaks = dist.all_sum(vec)
        if rank == 0:
            w = args.warmup
            t = sum(times[w:])
            res = {
                "name": args.name, "strategy": args.strategy if dist else "single",
                "gpus": world, "examples_per_step": len(plan.step_indices(0)),
                "steps": len(losses), "timed_steps": len(losses) - w,
                "tokens_per_s": round(sum(tokens[w:]) / t, 1),
                "tokens_per_s_per_gpu": round(sum(tokens[w:]) / t / world, 1),
                "step_ms_median": round(1e3 * statistics.median(times[w:]), 1),
                "first_step_s": round(times[0], 1),
                "peak_allocated_gib_per_gpu": [round(p, 2) for p in peaks],
                "micro_batches_per_rank": round(sum(micro) / len(micro), 2),
                "losses": [round(x, 5) for x in losses],
                "step_ms": [round(1e3 * x, 1) for x in times],
                "speed_notes": list(setup.speed.notes),
            }
            Path(args.result).write_text(json.dumps(res))


def _job(args: argparse.Namespace, name: str, gpus: int, strategy: str, accum: int,
         devices: list[int], out: Path, deadline: float) -> tuple[subprocess.Popen, Path]:
    result = out / f"_{name}.json"
    result.unlink(missing_ok=True)
    common = [__file__, "--worker", "--name", name, "--strategy", strategy, "--accum",
              str(accum), "--result", str(result), "--model-dir", args.model_dir, "--steps",
              str(args.steps), "--warmup", str(args.warmup), "--per-gpu", str(args.per_gpu),
              "--max-gpus", str(args.max_gpus), "--max-tokens", str(args.max_tokens)]
    if gpus == 1:
        cmd = [sys.executable, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={gpus}", *common]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))}
    print(f"== {name}: {' '.join(cmd[:6])} ... on GPUs {devices}", flush=True)
    return subprocess.Popen(cmd, env=env, start_new_session=True), result


def _collect(name: str, proc: subprocess.Popen, result: Path, deadline: float,
             started: float) -> dict[str, Any]:
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        return {"name": name, "error": "time limit"}
    try:
        res = json.loads(result.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        res = {"name": name, "error": f"exit {proc.returncode}"}
    res["wall_s"] = round(time.time() - started, 1)
    print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
    return res


def table(results: list[dict[str, Any]]) -> str:
    by = {r["name"]: r for r in results}
    base = by.get("1gpu")
    lines = ["| run | GPUs | examples/step | tok/s | tok/s per GPU | scaling eff. | eff. by median "
             "step | median step | slowest timed step | peak alloc / GPU | micro-batches / rank "
             "| loss vs 1-GPU same steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["name"].startswith("ref"):
            continue
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |" + " |" * 10)
            continue
        eff = (f"{100 * r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.1f}%"
               if base and "tokens_per_s_per_gpu" in base else "")
        # per-GPU tokens per step are about equal in every run, so median step times compare
        med = (f"{100 * base['step_ms_median'] / r['step_ms_median']:.1f}%"
               if base and "step_ms_median" in base else "")
        slowest = max(r.get("step_ms", [0])[r["steps"] - r["timed_steps"]:] or [0])
        ref = base if r["gpus"] == 1 else by.get(f"ref{r['gpus']}")
        cmp = ""
        if ref and "losses" in ref and r is not ref:
            n = min(len(ref["losses"]), len(r["losses"]))
            rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], ref["losses"][:n],
                                                          strict=True))
            cmp = f"max {100 * rel:.3f}% over {n} steps"
        lines.append(
            f"| {r['name']} | {r['gpus']} | {r['examples_per_step']} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {eff} | {med} | "
            f"{r['step_ms_median']:.0f} ms | {slowest:.0f} ms | {max(r['peak_allocated_gib_per_gpu']):.1f} GiB | "
            f"{r['micro_batches_per_rank']} | {cmp} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--model-dir", default="/tmp/qwen3-0.6b-shape")
    ap.add_argument("--gpus", default="1,2,4")
    ap.add_argument("--strategies", default="ddp,fsdp")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--per-gpu", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=40_960)
    ap.add_argument("--time-limit", type=float, default=420.0)
    ap.add_argument("--no-refs", action="store_true", help="skip the loss-reference runs")
    ap.add_argument("--ref-devices", default=None,
                    help="GPUs for the side-by-side reference runs (default 0,1,...)")
    ap.add_argument("--wait-file", default=None,
                    help="before the timed runs, wait (up to the time limit) for this file: "
                         "another job may hold some GPUs while the references run")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--accum", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--max-gpus", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    t0 = time.time()
    deadline = t0 + args.time_limit
    gpus = [int(g) for g in args.gpus.split(",")]
    args.max_gpus = max(gpus)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_model(Path(args.model_dir))
    results: list[dict[str, Any]] = []
    # Loss references first, side by side on separate GPUs (not timed).
    refs = [] if args.no_refs else [n for n in gpus if n > 1]
    ref_devices = ([int(d) for d in args.ref_devices.split(",")] if args.ref_devices
                   else list(range(len(refs))))
    if refs:
        jobs = [(f"ref{n}", *_job(args, f"ref{n}", 1, "ddp", n, [d], out, deadline))
                for n, d in zip(refs, ref_devices, strict=False)]
        results += [_collect(name, p, r, deadline, t0) for name, p, r in jobs]
    while args.wait_file and not Path(args.wait_file).exists() and time.time() < deadline:
        time.sleep(1)
    plan = [("1gpu", 1, "ddp")] + [(f"{s}{n}", n, s) for n in gpus if n > 1
                                   for s in args.strategies.split(",")]
    for name, n, strategy in plan:
        if time.time() > deadline - 20:
            results.append({"name": name, "error": "skipped: out of time"})
            continue
        started = time.time()
        proc, res = _job(args, name, n, strategy, n if n > 1 else 1, list(range(n)), out,
                         deadline)
        results.append(_collect(name, proc, res, deadline, started))
        (out / f"distributed-{args.tag}.json").write_text(json.dumps(results, indent=1))
    report = {"versions": versions(), "args": vars(args), "results": results}
    (out / f"distributed-{args.tag}.json").write_text(json.dumps(report, indent=1))
    text = json.dumps(report["versions"]) + "\n\n" + table(results)
    (out / f"distributed-{args.tag}.md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
