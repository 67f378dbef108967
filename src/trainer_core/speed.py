"""Per-device speed choices, in one place, so the engine's flow never changes for them.

:func:`plan_speed` decides, from the config and the device, which attention kernel to load the
model with, whether packed rows are padded to a fixed length (static shapes for compiled
kernels), how the model is prepared (compilation) and which loss function runs. The CPU path
is the plain one: sdpa with packing-aware masks from position ids, no compilation, the chunked
trained-positions loss of :mod:`trainer_core.loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from trainer_core.config import TrainerConfig


@attrs.define(frozen=True)
class SpeedPlan:
    """What the engine needs to know to run fast on one device."""

    attn_implementation: str
    #: Packed micro-batches are padded to a multiple of this many tokens (1: no padding).
    pad_to_multiple: int = 1
    #: ``prepare(model) -> model`` after loading (e.g. compile blocks); identity by default.
    prepare: Callable[[Any], Any] = attrs.field(default=lambda model: model)
    #: ``loss_fn(model, batch) -> (summed loss, trained tokens)``.
    loss_fn: Callable[[Any, dict[str, Any]], tuple[Any, int]] | None = None
    notes: tuple[str, ...] = ()

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        if self.loss_fn is not None:
            return self.loss_fn(model, batch)
        from trainer_core.loss import loss_sum

        return loss_sum(model, batch)


def plan_speed(cfg: TrainerConfig, device: Any) -> SpeedPlan:
    attn = cfg.model.attn_implementation
    if attn == "auto":
        attn = "sdpa"
    return SpeedPlan(attn_implementation=attn)
