"""Validation loss: token-weighted mean over the held-out examples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer_core.config import TrainerConfig
from trainer_core.model.loading import autocast
from trainer_core.model.speed import SpeedPlan
from trainer_core.train.inputs import to_device, token_budget


def evaluate(model: Any, examples: Sequence[dict[str, Any]], cfg: TrainerConfig, device: Any,
             precision: str, pad_id: int, speed: SpeedPlan) -> float | None:
    """Token-weighted mean loss over the validation examples."""
    import torch

    from trainer_core.data.batching import micro_batches

    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    budget = token_budget(cfg)
    with torch.no_grad(), autocast(device, precision):
        for batch in micro_batches(examples, cfg.data.packing, cfg.hyperparams.batch_size,
                                   budget, pad_id, speed.pad_to_multiple):
            loss, n = speed.loss(model, to_device(batch, device))
            total += float(loss)
            count += n
    model.train()
    return total / count if count else None
