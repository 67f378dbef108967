"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory ``checkpoints/step-000123/`` holding the model weights
(safetensors), the optimizer, scheduler and grad-scaler states, the RNG states and
``trainer_state.json`` (step, tokens seen, metrics history). It is written into a temporary
directory and renamed into place, so a crash mid-save never leaves a half checkpoint that a
resume would pick up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer_core.errors import UserError

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / CHECKPOINT_DIR


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path:
    """``resume`` is ``latest`` or a checkpoint directory."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).exists():
            raise UserError(f"{path}: not a checkpoint directory (no {STATE_FILE})")
        return path
    found = list_checkpoints(output_dir)
    if not found:
        raise UserError(f"--resume: no checkpoint in {checkpoint_root(output_dir)}")
    return found[-1]


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                    scaler: Any, state: dict[str, Any], keep: int | None,
                    model_state: dict[str, Any] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically; returns its path.

    ``model_state`` / ``optimizer_state`` replace ``model.state_dict()`` /
    ``optimizer.state_dict()`` when given (a sharded model's gathered full state, in the same
    format, so any world size can resume it).
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
    torch.save(
        {
            "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
        },
        tmp / "training_state.pt",
    )
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune_checkpoints(output_dir, keep)
    return final


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any
                    ) -> dict[str, Any]:
    """Restore states into the given objects; returns ``trainer_state.json``."""
    from safetensors.torch import load_model

    weights = path / "model.safetensors"
    if not weights.exists():
        raise UserError(f"{path}: checkpoint has no model.safetensors")
    load_model(model, weights, strict=False)
    blob = read_training_state(path)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob.get("scaler") is not None:
        scaler.load_state_dict(blob["scaler"])
    set_rng_state(blob["rng"])
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def read_training_state(path: Path) -> dict[str, Any]:
    """The optimizer, scheduler, scaler and RNG states of a checkpoint (``training_state.pt``)."""
    return torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
