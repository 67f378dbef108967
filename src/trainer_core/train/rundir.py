"""The run's output directory: file names, where it is, and the run manifest (run.json)."""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path
from typing import Any

from trainer_core import __version__
from trainer_core.config import TrainerConfig, config_hash
from trainer_core.errors import UserError
from trainer_core.files import write_json_atomic
from trainer_core.monitor.events import RunEnd, RunListener, RunStart
from trainer_core.plugins.registry import profile_origin
from trainer_core.train.inputs import dataset_path
from trainer_core.train.step import token_budget, warmup_steps

RUN_MANIFEST = "run.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
PREVIEWS_FILE = "previews.jsonl"
CONFIG_FILE = "trainer_config.json"


def locate_output(cfg: TrainerConfig, model_dir: Path, dry_run: bool, unlock: bool
                  ) -> tuple[Path, Path | None, dict[str, Any]]:
    """The output directory, the checkpoint to resume from (or None) and the lock facts.

    Checks the model against the config's locked fields and the output directory's lock before
    anything is written; writes the lock unless ``dry_run``.
    """
    from trainer_core.config.lock import (
        check_and_write_lock,
        check_model_against_config,
        expected_facts,
        model_facts,
    )

    base_model = cfg.locked.base_model or (cfg.model.path or "trainer/tiny-qwen3-demo")
    check_model_against_config(cfg, model_facts(model_dir))
    facts = expected_facts(cfg, model_dir, base_model)
    output_dir = Path(cfg.output.output_dir) if cfg.output.output_dir else default_output_dir(
        cfg.profile.name)
    resume_from = None
    if cfg.output.resume:
        from trainer_core.train.checkpoint import find_resume_checkpoint

        resume_from = find_resume_checkpoint(output_dir, cfg.output.resume)
    elif (output_dir / "checkpoints").exists() and not dry_run:
        raise UserError(f"{output_dir} already holds checkpoints of a run; pass --resume to "
                        "continue it, or choose another --output-dir")
    if not dry_run:
        check_and_write_lock(output_dir, facts, unlock=unlock)
    return output_dir, resume_from, facts


def plan_summary(cfg: TrainerConfig, profile: Any, model_dir: Path, output_dir: Path, plan: Any,
                 train_rows: list, val_rows: list, skipped: dict[str, int],
                 stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run plan (``--dry-run`` prints it; the final summary extends it)."""
    hp = cfg.hyperparams
    n_params = _param_count(model_dir)
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
        "estimated_memory_gb": _memory_estimate_gb(n_params, hp, cfg),
        "parameters": n_params,
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


def default_output_dir(profile_name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{profile_name}-{stamp}"


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


def _memory_estimate_gb(n_params: int | None, hp: Any, cfg: TrainerConfig) -> float | None:
    """Weights + grads + AdamW states in fp32 (16 bytes/param) plus a rough activation term."""
    if not n_params:
        return None
    tokens = token_budget(cfg)
    return round((16 * n_params + tokens * 4096 * 4) / 2**30, 2)


def run_manifest(cfg: TrainerConfig, profile: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """What run.json records about how the run was made (versions, data, plugins)."""
    import hashlib
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
        "dataset_sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(),
        "data": summary["data"],
        "model": summary["model"],
        "torch_version": md.version("torch"),
        "transformers_version": md.version("transformers"),
        "started_at": time.time(),
    }


def final_fields(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("state", "steps_done", "tokens_trained", "tokens_seen", "loss_start", "loss_end",
            "eval_loss", "preview_scores", "wall_time_s", "train_time_s", "tokens_per_s",
            "precision", "device")
    return {k: summary.get(k) for k in keys}
