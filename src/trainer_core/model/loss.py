"""The training loss: summed cross-entropy over trained positions only.

We run the decoder to get hidden states, keep only the positions whose target is trained, and
project those through the output embedding in chunks, recomputing each chunk's logits in the
backward pass. The full ``tokens x vocab`` logits (151,936 wide for Qwen3) never exist at
once: prompts cost no lm_head work, and peak memory is one chunk's logits.

The function returns a *sum*; the engine divides by the number of trained tokens of the whole
optimizer step, so every trained token weighs the same however the step was split into
micro-batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer_core.data.batching import IGNORE

#: Positions per lm_head chunk: 4096 x 151,936 fp32 logits is ~2.5 GB, recomputed in backward.
CHUNK = 4096


def decoder_of(model: Any) -> Any:
    """The body of a causal LM (everything before the lm_head)."""
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if getter is not None else None
    return decoder if decoder is not None else model.base_model


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, targets: torch.Tensor,
                             chunk: int = CHUNK) -> torch.Tensor:
    """``sum(cross_entropy(hidden @ weight.T + bias, targets))`` without all logits at once."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i : i + chunk], targets[i : i + chunk]
        if torch.is_grad_enabled() and hidden.shape[0] > chunk:
            total = total + checkpoint(_chunk_loss, h, weight, bias, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, bias, t)
    return total


def loss_sum(model: Any, batch: dict[str, Any], ce: Any = None, **decoder_kwargs: Any
             ) -> tuple[torch.Tensor, int]:
    """Summed loss of one micro-batch and its number of trained tokens.

    ``ce(hidden, weight, bias, targets)`` computes the summed cross-entropy of the kept
    positions (default :func:`linear_cross_entropy_sum`); ``decoder_kwargs`` go to the decoder
    (the CUDA path passes varlen boundaries this way).
    """
    decoder = decoder_of(model)
    embeds = batch.get("inputs_embeds")  # computed by the caller (model.graphs)
    out = decoder(
        input_ids=batch["input_ids"] if embeds is None else None,
        inputs_embeds=embeds,
        position_ids=batch.get("position_ids"),
        attention_mask=batch.get("attention_mask"),
        use_cache=False,
        **decoder_kwargs,
    )
    hidden = out.last_hidden_state
    head = model.get_output_embeddings()
    ce = ce or linear_cross_entropy_sum
    if "trained_index" in batch:
        # Fixed-shape form (CUDA graphs, trainer_core.model.graphs): the trained positions
        # were found on the host, padded with ignored targets that add nothing.
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["trained_index"])
        return ce(flat, head.weight, head.bias, batch["trained_targets"]), batch["n_trained"]
    targets = batch["targets"]
    keep = targets != IGNORE
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    return ce(hidden[keep], head.weight, head.bias, targets[keep]), n
