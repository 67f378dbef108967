"""GPU training throughput: trainer's engine against two Hugging Face recipes, side by side.

Model: Qwen3-0.6B's shape (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128,
intermediate 3072, vocab 151,936, tied embeddings), random init from seed 0, saved once as a
float32 model directory that every variant loads. bf16 autocast over float32 master weights,
AdamW (fused), lr 2e-4 constant, no warmup, weight decay 0, gradient clipping at 1.0.

Data: synthetic examples, lengths lognormal (median 400, sigma 0.8) clipped to [32, 2048]; the
first 30% of each example is prompt (not trained). Tokens are learnable, so the loss curve
means something: each example repeats a short motif of Zipf-distributed tokens with 10%
mutations (unigram statistics and in-context copying both lower the loss; attention leaking
across packed examples would change it). Every variant sees identical examples in identical
order, ``--examples-per-step`` (64) per optimizer step.

Variants (each runs in its own process, one after another, on the same card):
  trainer        trainer's engine exactly as ``trainer run`` sets it up on CUDA by default:
                 engine.pick_device / pick_precision / plan_speed / load_model /
                 speed.prepare / make_optimizer / lr_lambda, batching.micro_batches and
                 count_trained, engine.autocast and the SpeedPlan loss, in the engine's loop.
                 Config: batch_size 64 x gradient_accumulation 1 = 64 examples per step,
                 as recipe 3 (all 64 examples in one packed row: the token budget
                 batch_size x max_length never splits them); everything else default.
                 ``trainer[key=value,...]`` sets config overrides (the lever runs), e.g.
                 ``trainer[hyperparams.batch_size=8,hyperparams.gradient_accumulation=8]``
                 (micro-batches of <= 16,384 tokens, less memory); ``bench.steps=N`` in the
                 brackets shortens one run. ``trainer_profile`` is ``trainer`` followed by
                 a profile of its last 10 replayed steps run again: GPU time by kernel kind
                 against wall time (``BENCH_PROFILE_CPU=1`` adds the host side and, with
                 ``BENCH_PROFILE_DIR``, saves the trace).
  hf_padded      the Hugging Face Trainer default recipe as a plain loop: pad to longest,
                 8 examples per micro-batch (x8 accumulation), sdpa,
                 ``model(input_ids, attention_mask, labels, num_items_in_batch=...)`` as the
                 Trainer calls it, bf16 autocast, fused AdamW.
  hf_flat_liger  the best off-the-shelf recipe: DataCollatorWithFlattening (one packed row of
                 all 64 examples, position ids), flex_attention, Liger kernels (fused linear
                 cross-entropy, RMSNorm, RoPE, SwiGLU). ``hf_flat`` is the same without Liger.
  attn_micro     the varlen attention kernels alone, on the packed shapes of the first steps.
  ce_micro       the fused loss's chunk kernel alone: compiled formula against the Triton one.

Measured after ``--warmup`` steps over the remaining steps: non-padding tokens/s, trained
tokens/s, model TFLOP/s and MFU, peak GPU memory allocated, and each step's loss. Time to first
step (load excluded; compilation included) is reported separately.

FLOP convention (the same for all variants): per optimizer step,
``6 * N * non_pad_tokens + sum_examples 6 * L^2 * (heads * head_dim) * layers`` with N the
parameter count (596M, tied embedding counted once) and L each example's length (causal
attention, forward + backward = 3 x forward). MFU divides by 989.4 TFLOP/s, the dense bf16
peak of an H100/H200 SXM. Work a variant does beyond this (padding, logits of prompt tokens,
recomputation) is not counted; work it skips (lm_head on prompt tokens) is not subtracted.

    python bench/throughput.py --out DIR [--steps 50] [--warmup 10]
        [--variants trainer,hf_padded,hf_flat_liger] [--check]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHAPE = dict(vocab_size=151_936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128, intermediate_size=3072,
             max_position_embeddings=40_960)
PEAK_TFLOPS = 989.4
LR = 2e-4
PROFILE_STEPS = 10  # replayed steps profiled by the trainer_profile variant
MICRO = 8  # examples per micro-batch in the HF padded recipe (per_device_train_batch_size)


# --------------------------------------------------------------------------- model and data


def model_config(**overrides: Any) -> Any:
    import transformers

    shape = {**SHAPE, **overrides}
    return transformers.Qwen3Config(
        tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"], bos_token_id=151_643,
        eos_token_id=151_645, pad_token_id=151_643, rms_norm_eps=1e-6, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, use_cache=False,
        dtype="float32", **shape)


def ensure_model(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random-init Qwen3-0.6B-shaped model directory (float32), built once."""
    if (path / "config.json").exists():
        return path
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(model_config(**overrides))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_examples(n: int, seed: int = 0, vocab: int = SHAPE["vocab_size"],
                  median: float = 400, sigma: float = 0.8, lo: int = 32, hi: int = 2048,
                  prompt_frac: float = 0.3) -> list[dict[str, list[int]]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(median), sigma, n)), lo, hi).astype(int)
    ranks = 32_768
    p = 1.0 / (np.arange(ranks) + 10.0) ** 1.1
    p /= p.sum()
    ids_of_rank = rng.permutation(vocab)[:ranks]
    out = []
    for length in lengths:
        motif = ids_of_rank[rng.choice(ranks, size=int(rng.integers(8, 65)), p=p)]
        seq = np.tile(motif, -(-length // len(motif)))[:length].copy()
        flip = rng.random(length) < 0.1
        seq[flip] = ids_of_rank[rng.choice(ranks, size=int(flip.sum()), p=p)]
        cut = int(prompt_frac * length)
        ids = seq.tolist()
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def step_flops(examples: list[dict[str, Any]], n_params: int, cfg: dict[str, int]) -> float:
    attn = 6 * cfg["num_attention_heads"] * cfg["head_dim"] * cfg["num_hidden_layers"]
    return sum(6 * n_params * len(e["input_ids"]) + attn * len(e["input_ids"]) ** 2
               for e in examples)


# --------------------------------------------------------------------------- measurement


class Meter:
    def __init__(self, name: str, warmup: int) -> None:
        import torch

        self.name, self.warmup = name, warmup
        self.losses: list[float] = []
        self.step_times: list[float] = []
        self.tokens: list[int] = []
        self.trained: list[int] = []
        self.processed: list[int] = []
        self.flops: list[float] = []
        self.t_load = time.time()
        self.t_first: float | None = None
        self.t_prev = time.time()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def step(self, loss: float, examples: list[dict[str, Any]], processed: int,
             n_params: int, cfg: dict[str, int], last: bool = False) -> None:
        """Record a step that has returned. No device sync except after the ``last`` step:
        a run does not wait for the optimizer's kernels before collating the next step, so
        neither does the bench (each step's time is from one return to the next)."""
        import torch

        if self.cuda and last:
            torch.cuda.synchronize()
        now = time.time()
        if self.t_first is None:
            self.t_first = now - self.t_load
        self.step_times.append(now - self.t_prev)
        self.t_prev = now
        self.losses.append(loss)
        self.tokens.append(sum(len(e["input_ids"]) for e in examples))
        self.trained.append(sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples))
        self.processed.append(processed)
        self.flops.append(step_flops(examples, n_params, cfg))
        i = len(self.losses)
        if i <= 3 or i % 10 == 0:
            print(f"  [{self.name}] step {i}: loss {loss:.4f} {self.step_times[-1]*1e3:.0f} ms",
                  flush=True)

    def result(self) -> dict[str, Any]:
        import torch

        w = self.warmup
        t = sum(self.step_times[w:])
        tok = sum(self.tokens[w:])
        fl = sum(self.flops[w:])
        return {
            "variant": self.name,
            "steps": len(self.losses),
            "timed_steps": len(self.losses) - w,
            "time_to_first_step_s": round(self.t_first or 0.0, 2),
            "timed_s": round(t, 3),
            "tokens_per_s": round(tok / t, 1),
            "trained_tokens_per_s": round(sum(self.trained[w:]) / t, 1),
            "processed_tokens_per_s": round(sum(self.processed[w:]) / t, 1),
            "padding_fraction": round(1 - tok / max(1, sum(self.processed[w:])), 4),
            "tflops": round(fl / t / 1e12, 1),
            "mfu": round(fl / t / 1e12 / PEAK_TFLOPS, 4),
            "step_ms_median": round(1e3 * sorted(self.step_times[w:])[(len(self.step_times) - w) // 2], 1),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if self.cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)
            if self.cuda else None,
            "losses": [round(x, 5) for x in self.losses],
            "step_ms": [round(1e3 * x, 1) for x in self.step_times],
        }


def _n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _shape(model: Any) -> dict[str, int]:
    c = model.config
    return {"num_attention_heads": c.num_attention_heads, "head_dim": c.head_dim,
            "num_hidden_layers": c.num_hidden_layers}


# --------------------------------------------------------------------------- variant 1: trainer


def run_trainer(model_dir: Path, examples: list[dict[str, Any]], per_step: int, steps: int,
                warmup: int, overrides: dict[str, Any], name: str, profile: bool = False
                ) -> dict[str, Any]:
    """The engine's own setup and step (``prepare_training`` / ``train_step``), minus I/O."""
    from trainer_core.config import load_config
    from trainer_core.data.batching import count_trained, micro_batches, plan_steps
    from trainer_core.train import step as engine
    from trainer_core.train.inputs import Prefetcher, token_budget

    base = {
        "model.path": str(model_dir),
        "hyperparams.batch_size": per_step,
        "hyperparams.gradient_accumulation": 1,
        "hyperparams.learning_rate": LR,
        "hyperparams.lr_scheduler": "constant",
        "hyperparams.warmup_steps": 0,
        "hyperparams.max_steps": steps,
        "data.shuffle": False,
    }
    cfg = load_config(overrides={**base, **overrides})
    hp = cfg.hyperparams
    plan = plan_steps(len(examples), hp.batch_size * hp.gradient_accumulation, hp.num_epochs,
                      hp.max_steps, cfg.data.seed, cfg.data.shuffle)
    setup = engine.prepare_training(cfg, model_dir, plan.total_steps)
    model, speed = setup.model, setup.speed
    print(f"  [{name}] attn={speed.attn_implementation} notes={list(speed.notes)} "
          f"precision={setup.precision}", flush=True)
    budget = token_budget(cfg)
    pad_id = 151_643
    n_params, shape = _n_params(model), _shape(model)
    meter = Meter(name, warmup)
    collate_s = 0.0
    micro_counts = []
    graph_count: list[int] = []
    replay_only: list[bool] = []
    replayed: list[tuple[list[dict[str, Any]], int]] = []  # replay-only steps, for the profile
    def collate(step: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        batch_examples = [examples[i] for i in plan.step_indices(step)]
        batches = micro_batches(batch_examples, cfg.data.packing, hp.batch_size, budget, pad_id,
                                speed.pad_to_multiple)
        return batch_examples, batches, count_trained(batches)

    # As `trainer run`: the next step is collated in a thread once this one's work is queued,
    # so collate_ms_per_step is the time the loop waited for its inputs.
    inputs = Prefetcher(collate, plan.total_steps)
    pending: tuple[Any, ...] | None = None  # a step left running, read after the next launch

    def finish(step: int, batch_examples: list[dict[str, Any]], batches: list[dict[str, Any]],
               launched: Any) -> None:
        step_loss, grad_norm, _ = launched.result()
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            raise RuntimeError(f"non-finite loss {step_loss} / grad norm {grad_norm}")
        processed = sum(int(b["input_ids"].numel()) for b in batches)
        meter.step(step_loss, batch_examples, processed, n_params, shape,
                   last=step == plan.total_steps - 1)

    for step in range(plan.total_steps):
        t0 = time.time()
        batch_examples, batches, n_trained = inputs.get(step)
        collate_s += time.time() - t0 if step >= warmup else 0.0
        micro_counts.append(len(batches))
        before = setup.graphs.stats() if setup.graphs is not None else None
        # As `trainer run` (train/recipe.run_steps): a step left running is read once the next
        # one is launched, unless the next runs to its end at launch (eager, a capture).
        if pending is not None and not engine.runs_ahead(setup, batches):
            finish(*pending)
            pending = None
        launched = engine.launch_step(setup, batches, n_trained, hp.max_grad_norm,
                                      launched=functools.partial(inputs.prepare, step + 1))
        if before is not None:  # a step served by graph replays alone (no eager, no capture)
            after = setup.graphs.stats()
            replay_only.append(after["eager"] == before["eager"]
                               and after["graphs"] == before["graphs"])
            if replay_only[-1] and step >= warmup:
                replayed = [*replayed[-PROFILE_STEPS + 1:], (batches, n_trained)]
        if pending is not None:
            finish(*pending)
        pending = (step, batch_examples, batches, launched)
        if not launched.running or step == plan.total_steps - 1:
            finish(*pending)
            pending = None
        graph_count.append(_compiled_graphs())
    inputs.close()
    out = meter.result()
    if profile:
        out["profile"] = profile_steps(setup, replayed or [(batches, n_trained)], hp.max_grad_norm,
                                       name)
    # The last step after which torch.compile produced a new graph (recompiles), 1-based.
    out["last_compile_step"] = max((i + 1 for i in range(len(graph_count))
                                    if graph_count[i] > (graph_count[i - 1] if i else 0)),
                                   default=0)
    if setup.graphs is not None:
        out["cuda_graphs"] = setup.graphs.stats()
        # Steady state once a shape is captured (a long run's steps are almost all like this):
        # the timed steps that replayed graphs only.
        idx = [i for i in range(warmup, len(replay_only)) if replay_only[i]]
        if idx:
            t = sum(meter.step_times[i] for i in idx)
            out["replay_steps"] = len(idx)
            out["replay_tokens_per_s"] = round(sum(meter.tokens[i] for i in idx) / t, 1)
            out["replay_step_ms_median"] = round(
                1e3 * sorted(meter.step_times[i] for i in idx)[len(idx) // 2], 1)
    try:
        from torch._dynamo.utils import counters

        out["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break")}
    except Exception:  # pragma: no cover
        pass
    out.update({"attn_implementation": speed.attn_implementation, "notes": list(speed.notes),
                "overrides": overrides, "token_budget": budget,
                "micro_batches_per_step": round(sum(micro_counts) / len(micro_counts), 2),
                "collate_ms_per_step": round(1e3 * collate_s / max(1, steps - warmup), 2)})
    return out


def _compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover
        return 0


def profile_steps(setup: Any, steps: list[tuple[list[dict[str, Any]], int]],
                  max_grad_norm: float | None, name: str) -> dict[str, Any]:
    """Run ``steps`` again (shapes already captured, so graph replays only) under the profiler.

    GPU time by kernel kind against the wall time of the same steps, run back to back as the
    loop runs them (no sync between steps); idle is the part of the wall in which no kernel
    ran (the union of kernel intervals, so overlapping streams are not counted twice). The
    steps train the model further: this runs after the measured steps.
    """
    import tempfile

    import torch

    from trainer_core.train import step as engine

    acts = [torch.profiler.ProfilerActivity.CUDA]
    if os.environ.get("BENCH_PROFILE_CPU"):  # host side too: what the CPU does per step
        acts.append(torch.profiler.ProfilerActivity.CPU)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        pending = None
        for batches, n_trained in steps:  # overlapped as the loop runs them
            launched = engine.launch_step(setup, batches, n_trained, max_grad_norm)
            if pending is not None:
                pending.result()
            pending = launched
        if pending is not None:
            pending.result()
        sync()
        wall = 1e3 * (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp, "trace.json")
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
        out_dir = os.environ.get("BENCH_PROFILE_DIR")
        if out_dir and os.environ.get("BENCH_PROFILE_CPU"):
            import gzip

            safe = "".join(c if c.isalnum() else "_" for c in name)[:60]
            with gzip.open(Path(out_dir, f"trace-{safe}.json.gz"), "wb") as g:
                g.write(trace.read_bytes())
    kernels = [(float(e["ts"]), float(e["dur"]), e["name"]) for e in events
               if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    kinds: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for _, dur, key in kernels:
        kind = kernel_kind(key)
        kinds[kind] = kinds.get(kind, 0.0) + dur / 1e3
        by_name.setdefault(key, []).append(dur / 1e3)
    busy = _union_ms(kernels)
    n = len(steps)
    res = {"steps": n, "wall_ms_per_step": round(wall / n, 2),
           "gpu_busy_ms_per_step": round(busy / n, 2),
           "idle_pct": round(100 * (1 - busy / wall), 1),
           "kernels_per_step": round(len(kernels) / n, 1),
           "ms_per_step_by_kind": {k: round(v / n, 2) for k, v in
                                   sorted(kinds.items(), key=lambda kv: -kv[1])},
           "top_kernels": [[round(sum(v) / n, 3), len(v) // n, k[:120]] for k, v in
                           sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:60]]}
    lines = [f"profile {name}: {n} replayed steps, {res['wall_ms_per_step']} ms/step wall, "
             f"GPU busy {res['gpu_busy_ms_per_step']} ms (idle {res['idle_pct']}%), "
             f"{res['kernels_per_step']} kernels/step"]
    lines += [f"  {k:20s} {v:8.2f} ms/step" for k, v in res["ms_per_step_by_kind"].items()]
    lines += [f"  {t:8.3f} ms x{c:<4d} {k}" for t, c, k in res["top_kernels"]]
    print("\n".join(lines), flush=True)
    return res


def kernel_kind(name: str) -> str:
    k = name.lower()
    if "flash" in k or "fmha" in k:
        return "attention"
    if any(x in k for x in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")):
        return "gemm"
    if "adam" in k:
        return "optimizer"
    if k.startswith("triton"):
        return "triton (compiled)"
    if "memcpy" in k or "memset" in k:
        return "memcpy/memset"
    return "other"


def _union_ms(intervals: list[tuple[float, float, str]]) -> float:
    """Total time (ms) covered by at least one of the ``(start_us, duration_us, _)``."""
    total, end = 0.0, float("-inf")
    for start, dur, _ in sorted(intervals):
        stop = start + dur
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e3


# --------------------------------------------------------------------------- variants 2 and 3: HF


def _hf_model(model_dir: Path, attn: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation=attn)
    model.config.use_cache = False
    return model.to("cuda").train()


def _hf_loop(model: Any, examples: list[dict[str, Any]], per_step: int, steps: int, warmup: int,
             name: str, make_batches: Any) -> dict[str, Any]:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, fused=True)
    n_params, shape = _n_params(model), _shape(model)
    meter = Meter(name, warmup)
    for step in range(steps):
        step_examples = examples[step * per_step:(step + 1) * per_step]
        batches = make_batches(step_examples)
        n_items = sum(int((b["labels"][..., 1:] != -100).sum()) for b in batches)
        step_loss = 0.0
        for b in batches:
            b = {k: v.to("cuda", non_blocking=True) for k, v in b.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**b, use_cache=False, num_items_in_batch=n_items)
            out.loss.backward()
            step_loss += float(out.loss.detach())
            del out
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        processed = sum(int(b["input_ids"].numel()) for b in batches)
        meter.step(step_loss, step_examples, processed, n_params, shape, last=step == steps - 1)
    return meter.result()


def run_hf_padded(model_dir: Path, examples: list[dict[str, Any]], per_step: int, steps: int,
                  warmup: int, name: str) -> dict[str, Any]:
    import torch

    model = _hf_model(model_dir, "sdpa")

    def make_batches(step_examples):
        out = []
        for i in range(0, len(step_examples), MICRO):
            group = step_examples[i:i + MICRO]
            width = max(len(e["input_ids"]) for e in group)
            ids = torch.full((len(group), width), 151_643, dtype=torch.long)
            labels = torch.full((len(group), width), -100, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, e in enumerate(group):
                n = len(e["input_ids"])
                ids[r, :n] = torch.tensor(e["input_ids"])
                labels[r, :n] = torch.tensor(e["labels"])
                mask[r, :n] = 1
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        return out

    return _hf_loop(model, examples, per_step, steps, warmup, name, make_batches)


def run_hf_flat(model_dir: Path, examples: list[dict[str, Any]], per_step: int, steps: int,
                warmup: int, name: str, liger: bool) -> dict[str, Any]:
    from transformers import DataCollatorWithFlattening

    info: dict[str, Any] = {}
    if liger:
        import importlib.metadata as md

        from liger_kernel.transformers import apply_liger_kernel_to_qwen3

        apply_liger_kernel_to_qwen3(rope=True, rms_norm=True, swiglu=True,
                                    fused_linear_cross_entropy=True)
        info["liger_version"] = md.version("liger-kernel")
    model = _hf_model(model_dir, "flex_attention")
    collator = DataCollatorWithFlattening(return_position_ids=True)

    def make_batches(step_examples):
        return [collator([{"input_ids": e["input_ids"], "labels": e["labels"]}
                          for e in step_examples], return_tensors="pt")]

    out = _hf_loop(model, examples, per_step, steps, warmup, name, make_batches)
    out.update(info)
    return out


# --------------------------------------------------------------------------- GPU correctness


def adamw_microbench(model_dir: Path, steps: int = 20) -> dict[str, Any]:
    """torch's fused AdamW against the one-kernel Triton AdamW (environment.triton_adamw) on
    the model's parameters with random gradients, clipped (grad_scale) as a run does: median
    GPU ms per step, the bandwidth of 28 bytes per parameter, and the largest relative weight
    difference after ``steps`` steps."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    from trainer_core.train.adamw import adamw_step, supported

    def build() -> tuple[list[Any], Any]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": params[:-8], "weight_decay": 0.01},
                                 {"params": params[-8:], "weight_decay": 0.0}],
                                lr=1e-4, fused=True)
        return params, opt

    res: dict[str, Any] = {}
    finals = {}
    for name in ("torch_fused", "triton"):
        params, opt = build()
        assert supported(opt)
        gen = torch.Generator(device="cuda").manual_seed(1)
        times = []
        # .grad stays where it is, as in a run with CUDA graphs; the step is timed once the
        # host has queued it (so host-side launch costs, hidden in a graph, are not counted)
        for p in params:
            p.grad = torch.empty_like(p)
        opt.grad_scale = torch.tensor(1.3, device="cuda")
        opt.found_inf = torch.zeros((), device="cuda")
        for step in range(steps):
            for p in params:
                p.grad.normal_(0.0, 1e-3, generator=gen)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(20_000_000)  # keeps the GPU busy while the host queues the step
            start.record()
            if name == "triton" and step > 0:
                adamw_step(opt)
            else:
                opt.step()  # (the first step makes the state, as a run's first steps do)
            end.record()
            torch.cuda.synchronize()
            if step > 1:  # (step 1 also compiles the kernel)
                times.append(start.elapsed_time(end))
        n = sum(p.numel() for p in params)
        ms = statistics.median(times)
        res[name] = {"ms": round(ms, 3), "tb_per_s": round(28 * n / ms / 1e9, 2)}
        finals[name] = [p.detach().clone() for p in params]
        del params, opt
        torch.cuda.empty_cache()
    res["max_rel_diff"] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                              for a, b in zip(finals["triton"], finals["torch_fused"],
                                              strict=True))
    print("adamw:", json.dumps(res), flush=True)
    return res


def ce_kernel_microbench(rows: int = 8192, vocab: int = 151_936, repeats: int = 10
                         ) -> dict[str, Any]:
    """The fused loss's chunk kernel: inductor's compiled formula against the Triton kernel
    (environment.triton_cross_entropy) on one full chunk of bf16 logits, a few targets padded
    (-100) as in CUDA-graph batches. Median GPU ms, the bandwidth of one read and one write of
    the logits (the least any kernel moves), and the largest differences from the compiled one."""
    import statistics

    import torch

    from trainer_core.model.fused_loss import _ce_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(rows, vocab, device="cuda", generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    targets[::37] = -100
    res: dict[str, Any] = {"rows": rows, "vocab": vocab}
    outs = {}
    for name, triton_ce in (("compiled", False), ("triton", True)):
        kernel = _ce_kernel("cuda", triton_ce)
        times = []
        for i in range(repeats + 2):
            buf = logits.clone()  # the Triton kernel writes over its input
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss, grad = kernel(buf, targets)
            end.record()
            torch.cuda.synchronize()
            if i >= 2:  # the first calls compile
                times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        res[name] = {"ms": round(ms, 3),
                     "tb_per_s_of_read_write": round(2 * logits.numel() * 2 / ms / 1e9, 2)}
        outs[name] = (loss.float(), grad.float())
        del buf, grad
    res["loss_rel_diff"] = float((outs["triton"][0] - outs["compiled"][0]).abs()
                                 / outs["compiled"][0].abs())
    res["grad_max_abs_diff"] = float((outs["triton"][1] - outs["compiled"][1]).abs().max())
    print("ce kernel:", json.dumps(res), flush=True)
    return res


def run_checks() -> dict[str, Any]:
    """The fast pieces against plain references on this GPU (fresh random inputs)."""
    import torch

    from trainer_core.model.attention import _flash_varlen_op, varlen_reference
    from trainer_core.model.fused_loss import fused_linear_cross_entropy_sum
    from trainer_core.model.loss import linear_cross_entropy_sum

    res: dict[str, Any] = {}

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    g = torch.Generator(device="cuda").manual_seed(int(time.time()) % 10_000)
    lens = [37, 512, 1, 900, 128, 2048, 300]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    T = sum(lens)
    q = torch.randn(T, 16, 128, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(T, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(T, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    go = torch.randn(T, 16, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    out = _flash_varlen_op()(q, k, v, cu, max(lens), 128 ** -0.5, -1)[0]
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = varlen_reference(q64, k64, v64, cu, 128 ** -0.5)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    res["varlen_attention_rel_err"] = {"out": rel(out, ref), "dq": rel(dq, rq), "dk": rel(dk, rk),
                                       "dv": rel(dv, rv)}

    h = torch.randn(5000, 1024, device="cuda", generator=g, requires_grad=True)
    w = (0.02 * torch.randn(151_936, 1024, device="cuda", generator=g)).requires_grad_()
    t = torch.randint(0, 151_936, (5000,), device="cuda", generator=g)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = linear_cross_entropy_sum(h64, w64, None, t, chunk=1024)
    rh, rw = torch.autograd.grad(ref / 5000, (h64, w64))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused_linear_cross_entropy_sum(h, w, None, t, chunk=2048)
    fh, fw = torch.autograd.grad(out / 5000, (h, w))
    res["fused_ce_rel_err"] = {"loss": rel(out, ref), "dh": rel(fh, rh), "dw": rel(fw, rw)}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused_linear_cross_entropy_sum(h, w, None, t, chunk=2048, triton_ce=True)
    fh, fw = torch.autograd.grad(out / 5000, (h, w))
    res["fused_ce_triton_rel_err"] = {"loss": rel(out, ref), "dh": rel(fh, rh), "dw": rel(fw, rw)}
    print("checks:", json.dumps(res), flush=True)
    return res


def run_tiny_equivalence(tmp: Path) -> dict[str, Any]:
    """A small Qwen3 on the GPU: the default CUDA plan vs the plain path, 3 steps each."""
    model_dir = ensure_model(tmp / "tiny-model", seed=1, hidden_size=256, num_hidden_layers=4,
                             intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=64)
    ex = make_examples(3 * 16, seed=5, hi=1024)
    fast = run_trainer(model_dir, ex, 16, 3, 0, {}, "tiny-default")
    plain = run_trainer(model_dir, ex, 16, 3, 0, {
        "environment.compile": "off", "environment.fused_loss": "off",
        "model.attn_implementation": "sdpa"}, "tiny-plain")
    res = {"fast_losses": fast["losses"], "plain_losses": plain["losses"],
           "max_rel_diff": _max_rel_diff(fast["losses"], plain["losses"])}
    # CUDA graphs against the same plan without them, over steps that replay: the data repeat
    # every 4 steps, and a token budget of 4,096 splits each step into several micro-batches
    # (the first overwrites .grad, the others add to it).
    rep = make_examples(4 * 16, seed=6, hi=1024) * 3
    split = {"data.max_tokens_per_batch": 4096}
    graphed = run_trainer(model_dir, rep, 16, 12, 0, split, "tiny-graphs")
    eager = run_trainer(model_dir, rep, 16, 12, 0, {**split, "environment.cuda_graphs": "off"},
                        "tiny-no-graphs")
    res["graphs"] = {"cuda_graphs": graphed.get("cuda_graphs"),
                     "micro_batches_per_step": graphed["micro_batches_per_step"],
                     "max_rel_diff": _max_rel_diff(graphed["losses"], eager["losses"])}
    # Whole-step graphs (environment.graph_update): one micro-batch per step, so forward,
    # backward and AdamW replay as one graph; against the same plan without graphs.
    one = make_examples(4 * 8, seed=7, hi=1024) * 3
    whole = run_trainer(model_dir, one, 8, 12, 0, {}, "tiny-step-graphs")
    plain_one = run_trainer(model_dir, one, 8, 12, 0, {"environment.cuda_graphs": "off"},
                            "tiny-step-no-graphs")
    res["step_graphs"] = {"cuda_graphs": whole.get("cuda_graphs"),
                          "micro_batches_per_step": whole["micro_batches_per_step"],
                          "losses": whole["losses"], "plain_losses": plain_one["losses"],
                          "max_rel_diff": _max_rel_diff(whole["losses"], plain_one["losses"])}
    print("tiny equivalence:", json.dumps(res), flush=True)
    return res


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def attention_microbench(examples: list[dict[str, Any]], per_step: int) -> dict[str, Any]:
    """Varlen attention kernels on the packed micro-batches of the first steps (16k budget).

    Per micro-batch: 28 x (forward + backward) with fresh random q/k/v, as the layers do;
    shapes change from one micro-batch to the next as in training.
    """
    import torch

    from trainer_core.data.batching import pack_greedy
    from trainer_core.model.attention import _flash_varlen_op, varlen_reference

    mbs = []
    for step in range(4):
        ex = examples[step * per_step:(step + 1) * per_step]
        for g in pack_greedy([len(e["input_ids"]) for e in ex], 16384):
            mbs.append([len(ex[i]["input_ids"]) for i in g])
    scale = 128 ** -0.5
    res: dict[str, Any] = {}
    try:
        res["cudnn_fwd_schema"] = str(torch.ops.aten._cudnn_attention_forward.default._schema)
    except Exception as exc:  # pragma: no cover
        res["cudnn_fwd_schema"] = repr(exc)

    def flash(q, k, v, cu, m):
        return _flash_varlen_op()(q, k, v, cu, m, scale, -1)[0]

    def flash_mha(q, k, v, cu, m):
        k, v = (x.repeat_interleave(2, dim=1) for x in (k, v))
        return _flash_varlen_op()(q, k, v, cu, m, scale, -1)[0]

    def cudnn(q, k, v, cu, m):  # torch 2.11: wrong dq/dk and ~1 s per new shape (measured)
        k, v = (x.repeat_interleave(2, dim=1) for x in (k, v))
        return torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, m, m, True, 0.0, True, False, scale=scale)[0]

    def fa4(q, k, v, cu, m):
        from trainer_core.model.attention import _flash4_varlen_op

        return _flash4_varlen_op()(q, k, v, cu, m, scale, -1)[0]

    flops = sum(sum(6 * L * L * 16 * 128 for L in mb) for mb in mbs) * 28  # causal fwd+bwd
    res["fa4_graph_replay"] = _graph_replay_check(fa4)
    print("fa4_graph_replay", res["fa4_graph_replay"], flush=True)
    kernels = [("flash_gqa", flash), ("fa4_gqa", fa4)]
    if os.environ.get("BENCH_ATTN_ALL"):  # last round's dead ends (docs/throughput.md)
        kernels += [("flash_mha", flash_mha), ("cudnn_mha", cudnn)]
    for name, fn in kernels:
        try:
            # correctness on one micro-batch
            lens = mbs[1]
            cu, q, k, v, go = _attention_inputs(lens)
            out = fn(q, k, v, cu, max(lens))
            grads = torch.autograd.grad(out, (q, k, v), go)
            qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
            ref = varlen_reference(qf, kf, vf, cu, scale)
            rgrads = torch.autograd.grad(ref, (qf, kf, vf), go.float())
            errs = [float((a.float() - b).norm() / b.norm()) for a, b in
                    zip((out, *grads), (ref, *rgrads), strict=True)]
            torch.cuda.synchronize()
            times = []
            for _rep in range(2):
                t0 = time.time()
                for lens in mbs:
                    cu, q, k, v, go = _attention_inputs(lens)
                    for _layer in range(28):
                        out = fn(q, k, v, cu, max(lens))
                        torch.autograd.grad(out, (q, k, v), go)
                torch.cuda.synchronize()
                times.append(time.time() - t0)
            res[name] = {"rel_err_out_dq_dk_dv": [round(e, 5) for e in errs],
                         "first_pass_s": round(times[0], 3), "second_pass_s": round(times[1], 3),
                         "tflops": round(flops / times[1] / 1e12, 1),
                         "gpu_ms_per_step_graphed": _graphed_attention_ms(fn, mbs, 4)}
        except Exception as exc:
            res[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(name, res[name], flush=True)
    return res


def _attention_inputs(lens: list[int]) -> tuple[Any, Any, Any, Any, Any]:
    """Random packed bf16 ``cu_seqlens, q, k, v, grad_out`` for examples of ``lens`` tokens
    (Qwen3-0.6B's 16 query and 8 key/value heads of 128)."""
    import torch

    T = sum(lens)
    cu = torch.tensor([sum(lens[:i]) for i in range(len(lens) + 1)], dtype=torch.int32,
                      device="cuda")
    q, k, v = (torch.randn(T, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (16, 8, 8))
    return cu, q, k, v, torch.randn(T, 16, 128, device="cuda", dtype=torch.bfloat16)


def _graphed_attention_ms(fn: Any, mbs: list[list[int]], steps: int) -> float | str:
    """GPU time of 28 layers' forward + backward per step, replayed from CUDA graphs.

    Graph replay removes the launch overhead, as the trainer's graphs do, so this compares
    the kernels themselves. ``mbs`` are the steps' micro-batches (lists of example lengths).
    """
    import torch

    try:
        total = 0.0
        for lens in mbs:
            cu, q, k, v, go = _attention_inputs(lens)
            m = max(lens)
            for _ in range(2):
                torch.autograd.grad(fn(q, k, v, cu, m), (q, k, v), go)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _layer in range(28):
                    torch.autograd.grad(fn(q, k, v, cu, m), (q, k, v), go)
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            total += start.elapsed_time(end) / 3
        return round(total / steps, 2)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def _graph_replay_check(fn: Any) -> dict[str, Any]:
    """Capture ``fn``'s forward + backward in a CUDA graph, replay on new inputs, compare."""
    import torch

    try:
        cu, q, k, v, go = _attention_inputs([700, 300, 1200, 96, 64])
        for _ in range(2):  # compile and warm up outside the capture
            torch.autograd.grad(fn(q, k, v, cu, 2048), (q, k, v), go)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(q, k, v, cu, 2048)
            grads = torch.autograd.grad(out, (q, k, v), go)
        with torch.no_grad():
            for x in (q, k, v, go):
                x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = fn(q, k, v, cu, 2048)
        rgrads = torch.autograd.grad(ref, (q, k, v), go)
        diffs = [float((a - b).abs().max()) for a, b in zip((out, *grads), (ref, *rgrads),
                                                             strict=True)]
        return {"max_abs_diff_out_dq_dk_dv": diffs}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


# --------------------------------------------------------------------------- driver


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    if "[" not in spec:
        return spec, {}
    kind, rest = spec.split("[", 1)
    overrides: dict[str, Any] = {}
    for item in rest.rstrip("]").split(","):
        if item:
            key, raw = item.split("=", 1)
            try:
                overrides[key] = json.loads(raw)
            except json.JSONDecodeError:
                overrides[key] = raw
    return kind, overrides


def run_one(args: argparse.Namespace) -> None:
    import torch

    spec = args.run_variant
    kind, overrides = parse_variant(spec)
    overrides = {k: v for k, v in overrides.items() if not k.startswith("bench.env.")}
    # The data depend on --steps only: a shortened run (bench.steps) sees the same first steps.
    examples = make_examples(args.steps * args.examples_per_step, seed=args.data_seed)
    if "bench.steps" in overrides:
        args.steps = int(overrides.pop("bench.steps"))
    model_dir = Path(args.model_dir)
    try:
        if kind in ("trainer", "trainer_profile"):
            res = run_trainer(model_dir, examples, args.examples_per_step, args.steps,
                              args.warmup, overrides, spec, profile=kind == "trainer_profile")
        elif kind == "hf_padded":
            res = run_hf_padded(model_dir, examples, args.examples_per_step, args.steps,
                                args.warmup, spec)
        elif kind in ("hf_flat_liger", "hf_flat"):
            res = run_hf_flat(model_dir, examples, args.examples_per_step, args.steps,
                              args.warmup, spec, liger=kind == "hf_flat_liger")
        elif kind == "attn_micro":
            res = {"variant": "attn_micro", **attention_microbench(examples,
                                                                   args.examples_per_step)}
        elif kind == "ce_micro":
            res = {"variant": "ce_micro", **ce_kernel_microbench()}
        elif kind == "check":
            res = {"variant": "check", **run_checks(),
                   "adamw": adamw_microbench(Path(args.model_dir)),
                   "tiny": run_tiny_equivalence(Path(args.model_dir).parent)}
        else:
            raise SystemExit(f"unknown variant {spec}")
    except torch.cuda.OutOfMemoryError as exc:
        res = {"variant": spec, "error": f"out of memory: {str(exc)[:300]}",
               "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    except Exception as exc:  # report and carry on with the other variants
        import traceback

        traceback.print_exc()
        res = {"variant": spec, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    Path(args.result).write_text(json.dumps(res))


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "triton", "liger-kernel", "flash-attn-4",
                 "nvidia-cutlass-dsl"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return out


def table(results: list[dict[str, Any]], ref: str | None) -> str:
    ref_loss = next((r["losses"] for r in results if r["variant"] == ref and "losses" in r), None)
    base = next((r for r in results if r["variant"].startswith("hf_flat_liger")
                 and "tokens_per_s" in r), None)
    lines = ["| variant | tok/s | trained tok/s | TFLOP/s | MFU | step ms | first step s "
             "| peak alloc GiB | pad % | loss@1 | loss@50 | mean loss vs hf_padded | vs liger |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error'][:120]} |" + " |" * 11)
            continue
        if "tokens_per_s" not in r:
            continue
        losses = r["losses"]
        rel = ""
        if ref_loss is not None:
            n = min(len(losses), len(ref_loss))
            a, b = sum(losses[:n]) / n, sum(ref_loss[:n]) / n
            mx = max(abs(x - y) / abs(y) for x, y in zip(losses[:n], ref_loss[:n], strict=True))
            rel = f"{100 * (a - b) / b:+.2f}% (max step {100 * mx:.2f}%)"
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['trained_tokens_per_s']:,.0f} | "
            f"{r['tflops']:.0f} | {100 * r['mfu']:.1f}% | {r['step_ms_median']:.0f} | "
            f"{r['time_to_first_step_s']:.1f} | {r['peak_allocated_gib']:.1f} | "
            f"{100 * r['padding_fraction']:.1f} | {losses[0]:.3f} | {losses[-1]:.3f} | {rel} | "
            f"{vs} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--model-dir", default="/tmp/qwen3-0.6b-shape")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--examples-per-step", type=int, default=64)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--variants", default="trainer,hf_padded,hf_flat_liger")
    ap.add_argument("--check", action="store_true", help="GPU correctness checks first")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--run-variant", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_variant:
        run_one(args)
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ensure_model(Path(args.model_dir))
    print(f"model ready in {time.time() - t0:.1f}s", flush=True)
    specs = [s for s in _split_specs(args.variants) if s]
    if args.check:
        specs = ["check"] + specs
    results = []
    for spec in specs:
        res_file = out / f"_{len(results)}.json"
        cmd = [sys.executable, __file__, "--run-variant", spec, "--result", str(res_file),
               "--model-dir", args.model_dir, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--examples-per-step", str(args.examples_per_step),
               "--data-seed", str(args.data_seed)]
        print(f"== {spec}", flush=True)
        t = time.time()
        env = os.environ.copy()
        _, ov = parse_variant(spec)
        for key, value in ov.items():
            if key.startswith("bench.env."):
                env[key[len("bench.env."):]] = str(value)
        proc = subprocess.run(cmd, env=env)
        try:
            res = json.loads(res_file.read_text())
            res_file.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            res = {"variant": spec, "error": f"process exited {proc.returncode}"}
        res["wall_s"] = round(time.time() - t, 1)
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
        (out / f"throughput-{args.tag}.json").write_text(json.dumps(
            {"args": vars(args), "results": results}, indent=1))
    report = {"versions": versions(), "args": vars(args), "results": results}
    (out / f"throughput-{args.tag}.json").write_text(json.dumps(report, indent=1))
    text = (f"{json.dumps(report['versions'])}\n"
            f"{args.examples_per_step} examples/step, {args.steps} steps, first {args.warmup} "
            "not timed\n\n" + table(results, "hf_padded"))
    (out / f"throughput-{args.tag}.md").write_text(text + "\n")
    print(text)


def _split_specs(s: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


if __name__ == "__main__":
    main()
