"""The lock file that ties an output directory to one base model.

On the first run into a directory, the locked facts (base model, architecture, context length,
vocabulary size, model version) are written to ``trainer.lock.json`` there. A later run into the
same directory must match them, or fail before any work is done: continuing a run with another
model would silently mix two models' checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs

from trainer_core.config import Locked, TrainerConfig
from trainer_core.errors import UserError

LOCK_FILE = "trainer.lock.json"


def model_facts(model_dir: str | Path) -> dict[str, Any]:
    """Locked facts read from a Hugging Face model directory's config.json (no torch needed)."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; model.path must be a local model directory") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read model config: {exc}") from None
    text = data.get("text_config", data)  # multimodal configs nest the language model's
    archs = data.get("architectures") or [None]
    return {
        "model_architecture": archs[0],
        "max_context_length": text.get("max_position_embeddings"),
        "vocab_size": text.get("vocab_size"),
    }


def expected_facts(cfg: TrainerConfig, model_dir: str | Path, base_model: str) -> dict[str, Any]:
    """The facts this run will lock: what the user set in ``locked``, else the model's own."""
    facts = {"base_model": base_model, **model_facts(model_dir), "model_version": None}
    for key, value in attrs.asdict(cfg.locked).items():
        if value is not None:
            facts[key] = value
    return facts


def mismatches(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Fields set on both sides that differ: ``(field, a_value, b_value)``."""
    return [
        (f.name, a.get(f.name), b.get(f.name))
        for f in attrs.fields(Locked)
        if a.get(f.name) is not None and b.get(f.name) is not None and a[f.name] != b[f.name]
    ]


def check_model_against_config(cfg: TrainerConfig, facts: dict[str, Any]) -> None:
    """The user's explicit ``locked`` values must match the model they point at."""
    diffs = mismatches(attrs.asdict(cfg.locked), facts)
    if diffs:
        lines = ", ".join(f"locked.{k}={old!r} but the model has {new!r}" for k, old, new in diffs)
        raise UserError(f"the model does not match the locked config: {lines}")


def check_and_write_lock(output_dir: str | Path, facts: dict[str, Any], unlock: bool = False,
                         write: bool = True) -> None:
    """Compare ``facts`` with the directory's lock file (writing it on the first run; with
    ``write=False`` only compare)."""
    out = Path(output_dir)
    lock = out / LOCK_FILE
    if lock.exists() and not unlock:
        try:
            old = json.loads(lock.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{lock}: unreadable lock file: {exc}") from None
        diffs = mismatches(old, facts)
        if diffs:
            changes = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in diffs)
            raise UserError(
                f"{out} is locked to another model ({changes}). Use a new --output-dir, or pass "
                f"--unlock to continue in this directory with the new model."
            )
        return
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = lock.with_suffix(".tmp")
    tmp.write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, lock)
