"""What a run records about itself: the plan (``--dry-run`` prints it, with a memory
estimate), run.json (:class:`ManifestListener`: how the run was made, then its outcome), and
the facts a checkpoint keeps so that a resume can tell whether it is the same run
(:func:`resume_facts`).

The output directory itself (lock, state, resume targets) is :mod:`trainer_core.train.rundir`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from trainer_core import __version__
from trainer_core.config import TrainerConfig, config_hash
from trainer_core.files import RUN_MANIFEST, write_json_atomic
from trainer_core.model.adapters import adapter_facts, adapter_plan
from trainer_core.model.loading import layers_recomputed
from trainer_core.monitor.events import RunEnd, RunListener, RunStart
from trainer_core.plugins.registry import profile_origin
from trainer_core.train.inputs import data_sha256, dataset_path, token_budget
from trainer_core.train.step import warmup_steps


def plan_summary(cfg: TrainerConfig, profile: Any, model_dir: Path, output_dir: Path, plan: Any,
                 train_rows: list, val_rows: list, skipped: dict[str, int],
                 stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run plan (``--dry-run`` prints it; the final summary extends it)."""
    hp = cfg.hyperparams
    n_params = _param_count(model_dir)
    adapter = adapter_plan(cfg, model_dir)
    return {
        "state": "planned",
        "output_dir": str(output_dir),
        "model": str(model_dir),
        "profile": {"name": profile.name, "version": profile.version,
                    "options": profile.options_dict(), **profile_origin(profile.name)},
        "data": {"train_rows": len(train_rows), "validation_rows": len(val_rows),
                 "skipped_invalid": skipped, "train": stats["train"],
                 "validation": stats["validation"]},
        "steps": plan.total_steps,
        "examples_per_step": hp.batch_size * hp.gradient_accumulation,
        "warmup_steps": warmup_steps(cfg, plan.total_steps),
        "estimated_memory_gb": _memory_estimate_gb(n_params, hp, cfg, model_dir, stats["train"],
                                                   adapter),
        "parameters": n_params,
        "adapter": adapter,
    }


class ManifestListener(RunListener):
    """Writes run.json: what made the run at the start (state running), the outcome at the end."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / RUN_MANIFEST
        self.manifest: dict[str, Any] = {}

    def on_start(self, event: RunStart) -> None:
        self.manifest = dict(event.manifest)
        write_json_atomic(self.path, {**self.manifest, "state": "running"})

    def on_end(self, event: RunEnd) -> None:
        write_json_atomic(self.path, {**self.manifest, **final_fields(event.summary)})


def _param_count(model_dir: Path) -> int | None:
    """Parameter count from the safetensors header (no weights loaded)."""
    import json
    import struct

    total = 0
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                total += math.prod(v["shape"])
    return total


#: Resident memory of the process before the model: Python, torch, transformers, datasets and
#: the tokenizer (0.42 GB for the imports alone, measured by bench/memory.py).
RUNTIME_GB = 0.6
#: Trained positions whose logits exist at once (trainer_core.model.loss.CHUNK; not imported
#: here so that a dry run does not load torch).
LOSS_CHUNK = 4096


def _memory_estimate_gb(n_params: int | None, hp: Any, cfg: TrainerConfig, model_dir: Path,
                        train_stats: dict[str, Any] | None = None,
                        adapter: dict[str, Any] | None = None) -> float | None:
    """Peak resident memory of a training step, fitted to bench/memory.py on a CPU.

    The runtime, plus four copies of the weights (weights, gradients, AdamW's two moments;
    with an adapter, the frozen base's bytes and four float32 copies of the adapter),
    plus the activations kept for the backward pass (per token and layer about 10 hidden-size
    and 4 intermediate-size vectors; one hidden-size vector in a layer that recomputes them,
    ``hyperparams.checkpointed_layers`` or every layer with gradient checkpointing), plus
    the loss (about 6 vocabulary-wide fp32 vectors per trained token of a micro-batch, at most
    LOSS_CHUNK of them at a time). Tokens per micro-batch come from the data's mean row length.
    """
    if not n_params:
        return None
    import json

    try:
        mc = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        mc = {**mc, **(mc.get("text_config") or {})}  # multimodal configs nest the LM's
        hidden, layers = int(mc["hidden_size"]), int(mc["num_hidden_layers"])
        inter, vocab = int(mc.get("intermediate_size") or 4 * hidden), int(mc["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        hidden, layers, inter, vocab = 4096, 1, 0, 0  # unknown shape: the old rough term
    weight_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    act_bytes = 2 if hp.precision in ("bf16", "fp16") else 4
    stats = train_stats or {}
    rows, total, trained = (stats.get(k) or 0 for k in ("rows_kept", "total_tokens",
                                                        "trained_tokens"))
    budget = token_budget(cfg)
    per_batch = hp.batch_size * (hp.gradient_accumulation if cfg.data.packing else 1)
    tokens = min(budget, per_batch * total / rows) if rows else budget
    trained_tokens = min(LOSS_CHUNK, tokens * trained / total) if total else min(LOSS_CHUNK,
                                                                                  tokens)
    full_layer = 10 * hidden + 4 * inter  # values a token keeps per layer, none recomputed
    # layers that keep only their input (gradient checkpointing)
    recomputed = (layers_recomputed(hp.checkpointed_layers, layers)
                  if hp.gradient_checkpointing else 0)
    activations = tokens * (recomputed * hidden + (layers - recomputed) * full_layer) * act_bytes
    if recomputed:  # one layer's full activations during its recomputation
        activations += tokens * full_layer * act_bytes
    loss = trained_tokens * vocab * 4 * 6
    weights = 4 * weight_bytes * n_params
    if adapter is not None:
        weights = adapter["base_weight_bytes"] + 16 * adapter["trainable_parameters"]
    return round(RUNTIME_GB + (weights + activations + loss) / 2**30, 2)


def run_manifest(cfg: TrainerConfig, profile: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """What run.json records about how the run was made (versions, data, plugins)."""
    import importlib.metadata as md

    from trainer_core.plugins.registry import get_registry

    plugins = sorted({(p.distribution, p.version) for p in get_registry().plugins.values()
                      if p.status == "ok"})
    data_file = dataset_path(cfg)
    return {
        "trainer_core_version": __version__,
        "profile": summary["profile"],
        "plugins": [{"distribution": d, "version": v} for d, v in plugins],
        "config_hash": config_hash(cfg),
        "dataset": str(data_file),
        "dataset_sha256": data_sha256(data_file),
        "data": summary["data"],
        "model": summary["model"],
        "torch_version": md.version("torch"),
        "transformers_version": md.version("transformers"),
        "started_at": time.time(),
        # how many processes trained the run, and on how many GPUs (one per process on CUDA)
        "world_size": summary.get("world_size", 1),
        "distributed": summary.get("distributed"),
        "device_count": (summary.get("world_size", 1)
                         if summary.get("device_type") == "cuda" else 0),
    }


def final_fields(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("state", "reason", "steps_done", "tokens_trained", "tokens_seen", "loss_start",
            "loss_end", "eval_loss", "preview_scores", "wall_time_s", "train_time_s",
            "tokens_per_s", "segments", "warnings", "resumed_from", "accepted_changes",
            "precision", "device")
    return {k: summary.get(k) for k in keys}


def resume_facts(cfg: TrainerConfig, profile: Any, tokenizer: Any, total_steps: int,
                 world_size: int = 1) -> dict[str, Any]:
    """What shaped the run, as a checkpoint records it and a resume compares it
    (:func:`trainer_core.train.checkpoint.check_resume`): profile, data and tokenizer
    identities, the hyperparameters the optimizer and schedule baked in, the world size."""
    from trainer_core.data.chat import resolve_template
    from trainer_core.data.tokenizer import tokenizer_fingerprint

    hp, data = cfg.hyperparams, cfg.data
    return {
        "profile": {"name": profile.name, "version": profile.version,
                    "options": profile.options_dict()},
        "dataset_sha256": data_sha256(dataset_path(cfg)),
        "validation_sha256": data_sha256(Path(data.validation)) if data.validation else None,
        "validation_split": data.validation_split,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": _short_identity(resolve_template(cfg.model.chat_template,
                                                          tokenizer).identity()),
        "learning_rate": hp.learning_rate,
        "weight_decay": hp.weight_decay,
        "max_grad_norm": hp.max_grad_norm,
        "lr_scheduler": hp.lr_scheduler,
        "warmup_steps": warmup_steps(cfg, total_steps),
        "total_steps": total_steps,
        "batch_size": hp.batch_size,
        "gradient_accumulation": hp.gradient_accumulation,
        "packing": data.packing,
        "max_tokens_per_batch": token_budget(cfg),
        "max_length": hp.max_length,
        "truncation": data.truncation,
        "special_tokens_in_content": data.special_tokens_in_content,
        "data_seed": data.seed,
        "shuffle": data.shuffle,
        "seed": hp.seed,
        "world_size": world_size,
        **adapter_facts(cfg),
    }


def _short_identity(identity: str) -> str:
    import hashlib

    return identity if len(identity) <= 64 else "sha256:" + hashlib.sha256(
        identity.encode()).hexdigest()
