"""Adapter training throughput and peak memory: trainer against HF Trainer + peft, side by side.

Model: Qwen3-8B's shape (hidden 4096, 36 layers, 32 heads, 8 KV heads, head_dim 128,
intermediate 12288, vocab 151,936, untied embeddings), random weights from seed 0, saved once
in bf16 as a model directory that every variant loads (``--model-dir``; ~16 GB on disk).

Data: synthetic examples, lengths lognormal (median 400, sigma 0.8) clipped to [32, 2048], the
first 30% prompt (not trained), packed greedily into rows of at most 2,048 tokens. Every
variant trains the same rows in the same order: ``--grad-accum`` (4) rows per optimizer step,
one row per micro-batch.

Settings shared by every variant: LoRA r=16, alpha 32, no dropout, on every linear layer of
the decoder blocks; AdamW (fused) lr 2e-4 constant, clipping at 1.0; bf16 compute on CUDA.
QLoRA: the base in 4-bit NF4 with double quantization (bitsandbytes), compute in bf16, and
gradient checkpointing (``--qlora-checkpointing``, on by default: the 8B shape is meant to fit a
24 GB card).

Variants, each in its own process (so each peak is its own), one after another in one call:
  trainer_lora / trainer_qlora   trainer's engine as ``trainer run`` sets it up
                                 (``prepare_training`` with ``model.adapter``), stepping with
                                 ``train_step`` over the engine's own packed micro-batches.
  hf_lora / hf_qlora             ``transformers.Trainer`` on a ``peft`` model, the same rows
                                 (input_ids, position_ids, labels; sequential order),
                                 ``--hf-attn`` attention (flex_attention: packing-aware).
  hf_lora_liger / hf_qlora_liger the same with ``use_liger_kernel`` (only where liger-kernel is
                                 installed).
  trainer_lora_graphs            an experiment, not in the default list: CUDA graphs, which
                                 ``adapters.with_speed_switches`` turns off for adapters,
                                 kept on (measured 5% slower with LoRA on an H100).
  trainer_qlora_partial          an experiment: QLoRA with ``hyperparams.checkpointed_layers``
                                 = ``--checkpointed-layers`` (12 of 36 by default), the other
                                 layers keeping their activations (more memory, less
                                 recomputation; the peak must stay under 20 GiB);
                                 ``partialN`` names N itself (``partial0``: none recompute).
  *_nockpt (e.g. hf_qlora_liger_nockpt)
                                 an experiment: gradient checkpointing off.
  trainer_*_eager                an experiment: compiled decoder blocks off.
Suffixes combine: ``trainer_qlora_eager_partial6`` runs eager blocks with 6 layers recomputing.

Measured after ``--warmup`` steps: tokens/s (non-padding tokens of the measured steps over
their wall time, each step timed between CUDA synchronisations), peak GPU memory allocated
(from before the model loads), and the losses of the first and last step.

    python bench/adapters.py --out DIR [--steps 30] [--warmup 8] [--variants ...]
    python bench/adapters.py --tiny          # a tiny shape on the CPU, in seconds (a check)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHAPE_8B = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 151_936, "tie_word_embeddings": False,
            "max_position_embeddings": 40_960}
SHAPE_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "vocab_size": 2048, "tie_word_embeddings": False,
              "max_position_embeddings": 4096}
ROW = 2048  #: tokens per packed row (--tiny: 256)
VARIANTS = ("trainer_lora", "hf_lora", "hf_lora_liger", "trainer_qlora", "hf_qlora",
            "hf_qlora_liger")
RANK, ALPHA, LR = 16, 32.0, 2e-4


def keep_on(piece: str) -> None:
    """Let ``piece`` (``graphs``) through the adapters' speed switch."""
    import functools

    from trainer_core.model import adapters

    print(f"experiment: {piece} kept on", file=sys.stderr)
    adapters.with_speed_switches = functools.partial(adapters.with_speed_switches,
                                                     keep=(piece,))


def experiment_layers(experiment: list[str], default: int) -> int | None:
    """``hyperparams.checkpointed_layers`` for a variant's experiment suffixes: ``partial``
    takes ``default``, ``partialN`` takes N, no ``partial``: None (every layer)."""
    for e in experiment:
        if e.startswith("partial"):
            return int(e[len("partial"):]) if e != "partial" else default
    return None


def ensure_model(path: Path, shape: dict[str, Any]) -> Path:
    """A Qwen3 model directory of ``shape`` with random bf16 weights (seed 0), made once."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**shape, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      bos_token_id=0, eos_token_id=1, pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    os.replace(tmp, path)
    return path


def make_rows(n_rows: int, vocab: int, row: int = ROW, seed: int = 0
              ) -> list[list[dict[str, list[int]]]]:
    """``n_rows`` packed rows of at most ``row`` tokens (lists of examples, each
    ``{"input_ids", "labels"}``)."""
    import numpy as np

    from trainer_core.data.batching import pack_greedy

    rng = np.random.default_rng(seed)
    rows: list[list[dict[str, list[int]]]] = []
    while len(rows) < n_rows + 1:  # the last group may be short: never used
        lengths = np.clip(rng.lognormal(math.log(400 * row / ROW), 0.8, 64), 32,
                          row).astype(int)
        examples = []
        for n in lengths:
            ids = rng.integers(2, vocab, int(n)).tolist()
            prompt = int(0.3 * n)
            examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        groups = pack_greedy([len(e["input_ids"]) for e in examples], row)
        rows.extend([[examples[i] for i in grp] for grp in groups[:-1]])
    return rows[:n_rows]


class Meter:
    """Per-step wall times and tokens; the summary over the steps after warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.tokens, self.losses = warmup, [], [], []

    def step(self, seconds: float, tokens: int, loss: float | None) -> None:
        self.times.append(seconds)
        self.tokens.append(tokens)
        if loss is not None:
            self.losses.append(loss)

    def result(self) -> dict[str, Any]:
        import torch

        t, n = self.times[self.warmup:], self.tokens[self.warmup:]
        out: dict[str, Any] = {
            "steps_measured": len(t), "tokens_per_s": round(sum(n) / sum(t), 1) if t else None,
            "step_ms": round(1000 * sum(t) / len(t), 1) if t else None,
            "first_step_s": round(self.times[0], 2) if self.times else None,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None}
        if torch.cuda.is_available():
            out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:
            import resource

            out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 2**20, 2)
        return out


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_trainer(kind: str, model_dir: Path, rows: list, steps: int, accum: int, warmup: int,
                checkpointing: bool, row: int = ROW, checkpointed_layers: int | None = None,
                compiled: bool = True) -> dict[str, Any]:
    from trainer_core.config import resolve
    from trainer_core.data.batching import count_tokens, count_trained, micro_batches
    from trainer_core.train.step import prepare_training, train_step

    cfg = resolve(cli={
        "model.path": str(model_dir), "model.adapter": kind, "adapter.rank": RANK,
        "adapter.alpha": ALPHA, "hyperparams.learning_rate": LR,
        "hyperparams.lr_scheduler": "constant", "hyperparams.warmup_steps": 0,
        "hyperparams.max_length": row, "data.max_tokens_per_batch": row,
        "hyperparams.batch_size": 64, "hyperparams.gradient_checkpointing": checkpointing,
        "hyperparams.checkpointed_layers": checkpointed_layers,
        **({} if compiled else {"environment.compile": "off"}),
    }).config
    setup = prepare_training(cfg, model_dir, steps)
    trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    meter = Meter(warmup)
    for s in range(steps):
        step_rows = rows[s * accum:(s + 1) * accum]
        batches = [micro_batches(r, True, len(r), row, 0, setup.speed.pad_to_multiple)[0]
                   for r in step_rows]
        _sync()
        t0 = time.perf_counter()
        loss, _, _ = train_step(setup, batches, count_trained(batches), 1.0)
        _sync()
        meter.step(time.perf_counter() - t0, count_tokens(batches), loss)
    return {**meter.result(), "trainable_parameters": trainable,
            "speed": list(setup.speed.notes)}


def hf_rows(rows: list) -> list[dict[str, list[int]]]:
    """The packed rows as HF Trainer takes them: labels unshifted, -100 at each example's
    first position (no prediction across examples, as DataCollatorWithFlattening does)."""
    out = []
    for row in rows:
        ids, pos, labels = [], [], []
        for ex in row:
            n = len(ex["input_ids"])
            ids += ex["input_ids"]
            pos += list(range(n))
            labels += [-100] + ex["labels"][1:]
        out.append({"input_ids": ids, "position_ids": pos, "labels": labels})
    return out


def run_hf(kind: str, model_dir: Path, rows: list, steps: int, accum: int, warmup: int,
           checkpointing: bool, liger: bool, attn: str, tmp: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if kind == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=attn,
                                                 **kwargs)
    if cuda and kind != "qlora":
        model = model.cuda()
    model = get_peft_model(model, LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = hf_rows(rows[:steps * accum])
    tokens = [sum(len(r["input_ids"]) for r in data[s * accum:(s + 1) * accum])
              for s in range(steps)]
    meter = Meter(warmup)
    clock: dict[str, Any] = {}

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync()
            clock["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            meter.step(time.perf_counter() - clock["t0"], tokens[state.global_step - 1], None)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                meter.losses.append(float(logs["loss"]))

    class InOrder(Trainer):
        def _get_train_sampler(self, *args: Any, **kw: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    def collate(features: list[dict[str, list[int]]]) -> dict[str, Any]:
        return {k: torch.tensor([f[k] for f in features]) for k in features[0]}

    args = TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=1, gradient_accumulation_steps=accum,
        max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cuda, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        use_liger_kernel=liger, remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=not cuda, seed=0)
    InOrder(model=model, args=args, train_dataset=data, data_collator=collate,
            callbacks=[Timing()]).train()
    return {**meter.result(), "trainable_parameters": trainable}


def run_one(args: argparse.Namespace) -> None:
    variant = args.one
    engine, kind, *experiment = variant.split("_")
    layers = experiment_layers(experiment, args.checkpointed_layers)
    if engine == "trainer" and "graphs" in experiment:
        keep_on("graphs")
    shape = SHAPE_TINY if args.tiny else SHAPE_8B
    rows = make_rows(args.steps * args.grad_accum, shape["vocab_size"], args.row)
    checkpointing = (kind == "qlora" and args.qlora_checkpointing
                     and "nockpt" not in experiment)
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    if engine == "trainer":
        result = run_trainer(kind, args.model_dir, rows, args.steps, args.grad_accum,
                             args.warmup, checkpointing, args.row, layers,
                             compiled="eager" not in experiment)
    else:
        result = run_hf(kind, args.model_dir, rows, args.steps, args.grad_accum, args.warmup,
                        checkpointing, variant.endswith("_liger"), args.hf_attn,
                        args.out / f"hf-{variant}")
    result.update(variant=variant, gradient_checkpointing=checkpointing,
                  checkpointed_layers=layers,
                  wall_s=round(time.time() - started, 1))
    print("RESULT " + json.dumps(result), flush=True)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def wanted(variants: list[str], cuda: bool) -> tuple[list[str], list[str]]:
    """The variants that can run here, and one line for each that cannot."""
    import importlib.util

    run, skipped = [], []
    for v in variants:
        if "qlora" in v and not cuda:
            skipped.append(f"{v}: skipped (QLoRA needs a CUDA GPU)")
        elif "qlora" in v and importlib.util.find_spec("bitsandbytes") is None:
            skipped.append(f"{v}: skipped (bitsandbytes not installed)")
        elif v.endswith("_liger") and importlib.util.find_spec("liger_kernel") is None:
            skipped.append(f"{v}: skipped (liger-kernel not installed)")
        else:
            run.append(v)
    return run, skipped


def table(results: list[dict[str, Any]]) -> str:
    by = {r["variant"]: r for r in results}
    lines = ["| variant | tokens/s | vs HF Trainer + peft | step ms | peak GiB | first step s "
             "| loss first -> last | trainable params |", "|" + " --- |" * 8]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error'][:80]} |" + " |" * 6)
            continue
        hf = by.get(f"hf_{r['variant'].split('_')[1]}", {})
        ratio = (f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x"
                 if hf.get("tokens_per_s") and r.get("tokens_per_s") else "-")
        peak = r.get("peak_gib", r.get("peak_rss_gib"))
        loss = (f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"
                if r.get("loss_first") is not None else "-")
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {ratio} | {r['step_ms']} "
                     f"| {peak} | {r['first_step_s']} | {loss} | "
                     f"{r['trainable_parameters']:,} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-adapters"))
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--hf-attn", default="flex_attention")
    ap.add_argument("--qlora-checkpointing", default=True, action=argparse.BooleanOptionalAction)
    ap.add_argument("--checkpointed-layers", type=int, default=12,
                    help="trainer_qlora_partial: how many decoder layers recompute")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (checks the "
                    "script; the numbers mean nothing)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (4 if args.tiny else 30)
    args.row = 256 if args.tiny else ROW
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 8)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.hf_attn = "sdpa" if args.hf_attn == "flex_attention" else args.hf_attn
    args.model_dir = args.model_dir or args.out / ("qwen3-tiny" if args.tiny else "qwen3-8b-shape")
    if args.one:
        run_one(args)
        return
    import torch

    ensure_model(args.model_dir, SHAPE_TINY if args.tiny else SHAPE_8B)
    cuda = torch.cuda.is_available()
    variants, skipped = wanted([v for v in args.variants.split(",") if v], cuda)
    results = []
    for v in variants:
        cmd = [sys.executable, __file__, "--one", v, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode == 0 and found:
            results.append(json.loads(found[-1][7:]))
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            results.append({"variant": v, "error": tail[-1] if tail else f"exit {proc.returncode}"})
        print(f"{v}: {json.dumps(results[-1])}", flush=True)
    info = {"device": torch.cuda.get_device_name() if cuda else "cpu", "tiny": args.tiny,
            "steps": args.steps, "warmup": args.warmup, "grad_accum": args.grad_accum,
            "row_tokens": args.row, "hf_attn": args.hf_attn, "versions": versions()}
    (args.out / "results.json").write_text(json.dumps({"info": info, "results": results,
                                                       "skipped": skipped}, indent=1))
    print(json.dumps(info))
    print(table(results))
    for line in skipped:
        print(line)


if __name__ == "__main__":
    main()
