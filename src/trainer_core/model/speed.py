"""Per-device speed choices, in one place, so the engine's flow never changes for them.

:func:`plan_speed` decides, from the config and the device, which attention kernel to load the
model with, whether packed rows are padded to a fixed length (static shapes for compiled
kernels), how the model is prepared (compilation) and which loss function runs.

The CPU path is the plain one and stays exactly as it was: sdpa with packing-aware masks from
position ids, no compilation, the chunked trained-positions loss of :mod:`trainer_core.model.loss`.

On CUDA, by default (each piece has its own switch; ``docs/throughput.md`` has the numbers):

* **varlen flash attention** (``model.attn_implementation: auto``; choose ``sdpa`` or
  ``flex_attention`` there to turn it off). A packed row holds many examples; sdpa would need a
  ``T x T`` block-diagonal mask and compute every masked block, which collapses for rows of
  tens of thousands of tokens. Instead the loss passes each micro-batch's cumulative example
  lengths (``cu_seqlens``, built once per micro-batch from ``seq_lens``) down to every layer,
  and attention runs PyTorch's own FlashAttention-2 varlen kernel
  (``aten._flash_attention_forward``), or FlashAttention-4's on a Hopper GPU where the
  ``flash-attn-4`` wheel is installed (``environment.attention_kernel``): no mask at all, work
  proportional to ``sum(len_i^2)``. Without those lengths (generation, padded batches) the same attention
  implementation falls back to plain sdpa with transformers' masks, so nothing else changes.
* **compiled decoder blocks** (``environment.compile``): every decoder layer is compiled in
  place (regional compilation: one compiled graph serves all layers). Inductor fuses the
  RMSNorms, RoPE, SwiGLU, residual adds and autocast casts; sequence length is dynamic, so
  packed rows of any length reuse the same code. A norm backward's two sums are computed in
  one pass without length guards (``environment.mix_order_reduction``).
* **fused linear cross-entropy** (``environment.fused_loss``): the lm_head projection and the
  cross-entropy run chunk by chunk, and the forward pass already computes the gradients of the
  hidden states and of the output embedding (softmax minus one-hot, by the Triton kernel of
  :mod:`trainer_core.model.cross_entropy`, ``environment.triton_cross_entropy``, or a compiled
  one), so the backward pass only scales them. The full ``tokens x vocab`` logits never exist,
  prompt positions cost nothing, and the logits are not recomputed as in the checkpointed CPU
  loss.

The pieces live by concern: :mod:`~trainer_core.model.attention` (varlen attention, FA2/FA4 ops),
:mod:`~trainer_core.model.fa4_warmup` (FA4's kernels compiled ahead in other processes),
:mod:`~trainer_core.model.fused_loss` (the fused loss and :func:`make_loss_fn`) and
:mod:`~trainer_core.model.tuning` (compile cache, compiled blocks, allocators). This module is
the plan alone.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import attrs

from trainer_core.config import TrainerConfig
from trainer_core.model.attention import (
    attention_kernel,
    register_varlen_attention,
    varlen_available,
)
from trainer_core.model.fused_loss import make_loss_fn
from trainer_core.model.tuning import compile_blocks, persist_compile_cache


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
    #: What was chosen (read by the CUDA-graph decision, :mod:`trainer_core.model.graphs`).
    varlen: bool = False
    #: The varlen attention's kernel (``fa2`` or ``fa4``; empty without varlen attention).
    attention_kernel: str = ""
    fused: bool = False
    compiled: bool = False
    #: Clip and update on the device before the step's loss is read (``environment.device_update``).
    device_update: bool = False
    #: The optimizer step joins single-micro-batch CUDA graphs (``environment.graph_update``).
    graph_update: bool = False
    #: CUDA-graph steps add the embedding gradient by rows (``environment.embedding_grad_rows``).
    embedding_rows: bool = False
    #: AdamW as one Triton kernel where it can be (``environment.triton_adamw``).
    triton_adamw: bool = False

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        if self.loss_fn is not None:
            return self.loss_fn(model, batch)
        from trainer_core.model.loss import loss_sum

        return loss_sum(model, batch)


def _on(switch: str, default: bool) -> bool:
    return default if switch == "auto" else switch == "on"


def plan_speed(cfg: TrainerConfig, device: Any) -> SpeedPlan:
    cuda = getattr(device, "type", str(device)) == "cuda"
    env = cfg.environment
    notes: list[str] = []
    attn = cfg.model.attn_implementation
    varlen = False
    kernel = ""
    if cuda:
        # Before anything imports torch._inductor (FA4's import does), which may fix its
        # cache folder on first use.
        persist_compile_cache()
    if attn == "auto":
        if cuda and varlen_available():
            kernel = attention_kernel(env.attention_kernel)
            attn = register_varlen_attention(kernel)
            varlen = True
            notes.append(f"attention: varlen {kernel} (packed rows, no mask)")
        else:
            attn = "sdpa"
    use_compile = _on(env.compile, cuda)
    fused = _on(env.fused_loss, cuda)
    if use_compile:
        notes.append("decoder blocks compiled (torch.compile, dynamic sequence length)")
    if fused:
        notes.append("fused linear cross-entropy")
    triton_ce = (fused and cuda and _on(env.triton_cross_entropy, True)
                 and importlib.util.find_spec("triton") is not None)
    if triton_ce:
        notes.append("loss gradient by a Triton kernel")
    loss_fn = make_loss_fn(varlen, fused, triton_ce) if (varlen or fused) else None
    mix_order = env.mix_order_reduction
    prepare = ((lambda model: compile_blocks(model, mix_order)) if use_compile
               else (lambda model: model))
    return SpeedPlan(attn_implementation=attn, prepare=prepare, loss_fn=loss_fn,
                     notes=tuple(notes), varlen=varlen, attention_kernel=kernel, fused=fused,
                     compiled=use_compile, device_update=_on(env.device_update, cuda),
                     graph_update=_on(env.graph_update, cuda),
                     embedding_rows=_on(env.embedding_grad_rows, cuda),
                     triton_adamw=_on(env.triton_adamw, cuda))
