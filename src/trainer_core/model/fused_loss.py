"""The fused linear cross-entropy, and the loss function the speed plan hands the engine.

The lm_head projection and the cross-entropy run chunk by chunk, and the forward pass already
computes the gradients of the hidden states and of the output embedding (softmax minus one-hot,
by the Triton kernel of :mod:`trainer_core.model.cross_entropy` or a compiled one), so the
backward pass only scales them. The full ``tokens x vocab`` logits never exist, prompt
positions cost nothing, and the logits are not recomputed as in the checkpointed CPU loss
(:mod:`trainer_core.model.loss`). :func:`make_loss_fn` puts it together with the varlen
attention's lengths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from trainer_core.model.attention import _skip_masks, varlen_kwargs
from trainer_core.model.tuning import persist_compile_cache

#: Rows per lm_head chunk in the fused loss: 8192 x 151,936 bf16 logits is ~2.5 GB.
FUSED_CHUNK = 8192


def make_loss_fn(varlen: bool, fused: bool, triton_ce: bool = False
                 ) -> Callable[[Any, dict[str, Any]], tuple[Any, int]]:
    """``loss_fn(model, batch)`` like :func:`trainer_core.model.loss.loss_sum`, with the fast pieces.

    ``triton_ce``: the fused loss's chunks use :mod:`trainer_core.model.cross_entropy` on CUDA.
    """
    from trainer_core.model.loss import linear_cross_entropy_sum, loss_sum

    ce: Callable[..., Any] = linear_cross_entropy_sum
    if fused:
        ce = functools.partial(fused_linear_cross_entropy_sum, triton_ce=triton_ce)

    def loss_fn(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        input_ids = batch["input_ids"]
        extra: dict[str, Any] = {}
        packed = (varlen and batch.get("attention_mask") is None and "seq_lens" in batch
                  and input_ids.shape[0] == 1)
        if varlen and "cu_seqlens" in batch:  # the fixed-shape form of model.graphs
            packed = True
            extra = {"trainer_cu_seqlens": batch["cu_seqlens"],
                     "trainer_max_seqlen": batch["max_seqlen"]}
        elif packed:
            extra = varlen_kwargs(batch["seq_lens"], input_ids.device)
        with _skip_masks(packed):
            return loss_sum(model, batch, ce=ce, **extra)

    loss_fn.__name__ = f"loss_sum_{'varlen' if varlen else 'masked'}_{'fused' if fused else 'chunked'}"
    return loss_fn


def _ce_loss_and_grad(logits: Any, targets: Any) -> tuple[Any, Any]:
    """Summed cross-entropy of one chunk and its gradient w.r.t. the logits (softmax - onehot).

    Negative targets (padding of the fixed-shape batches of CUDA graphs) add no loss and no
    gradient.
    """
    import torch

    x = logits.float()
    valid = (targets >= 0).float()
    safe = targets.clamp_min(0)
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = ((lse - target_logit) * valid).sum()
    vocab = torch.arange(x.shape[1], device=x.device)
    grad = torch.exp(x - lse.unsqueeze(1)) - (vocab.unsqueeze(0) == safe.unsqueeze(1)).float()
    return loss, (grad * valid.unsqueeze(1)).to(logits.dtype)


_compiled_ce: dict[str, Callable[..., Any]] = {}


def _ce_kernel(device_type: str, triton_ce: bool = False) -> Callable[..., Any]:
    """The chunk kernel: on CUDA the Triton one (``triton_ce``) or compiled; eager elsewhere."""
    if device_type != "cuda":
        return _ce_loss_and_grad
    if triton_ce:
        from trainer_core.model.cross_entropy import ce_loss_and_grad_inplace

        return ce_loss_and_grad_inplace
    fn = _compiled_ce.get(device_type)
    if fn is None:
        import torch

        # dynamic from the first call: chunk sizes vary, and a recompile is never wanted later
        # (it must not happen while a CUDA graph is being captured).
        persist_compile_cache()
        fn = torch.compile(_ce_loss_and_grad, dynamic=True)
        _compiled_ce[device_type] = fn
    return fn


_mm_fp32_ok: dict[str, bool] = {}


def _even_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[0, n)`` in near-equal pieces of at most ``chunk`` (no small remainder GEMM)."""
    pieces = max(1, -(-n // chunk))
    size = -(-n // pieces)
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _accumulate_grad_weight(grad_w: Any, g: Any, h: Any) -> Any:
    """``grad_w + g.T @ h`` in float32, straight out of the matmul where supported."""
    import torch

    dev = g.device.type
    if _mm_fp32_ok.get(dev, dev == "cuda") and g.dtype != torch.float32:
        try:
            if grad_w is None:
                out = torch.mm(g.t(), h, out_dtype=torch.float32)
            else:
                out = torch.addmm(grad_w, g.t(), h, out_dtype=torch.float32)
            _mm_fp32_ok[dev] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _mm_fp32_ok[dev] = False
    part = torch.mm(g.t(), h).float()
    return part if grad_w is None else grad_w.add_(part)


def _compute_dtype(device_type: str, weight: Any) -> Any:
    import torch

    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _LinearCrossEntropySum:
    """autograd.Function (built lazily so importing this module needs no torch)."""

    fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.fn is not None:
            return cls.fn
        import torch
        import torch.nn.functional as F

        class LinearCrossEntropySum(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, targets: Any,
                        chunk: int, triton_ce: bool) -> Any:
                dev = hidden.device.type
                dtype = _compute_dtype(dev, weight)
                kernel = _ce_kernel(dev, triton_ce)
                with torch.autocast(dev, enabled=False):
                    w = weight.to(dtype)
                    b = bias.to(dtype) if bias is not None else None
                    hs = hidden.to(dtype)
                    grad_h = torch.empty_like(hs)
                    grad_w = None
                    grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                              if bias is not None else None)
                    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                    for i, j in _even_chunks(hs.shape[0], chunk):
                        h = hs[i:j]
                        logits = F.linear(h, w, b)
                        loss, g = kernel(logits, targets[i:j])
                        del logits
                        total += loss
                        torch.mm(g, w, out=grad_h[i:j])
                        if ctx.needs_input_grad[1]:  # a frozen head (adapters): no GEMM
                            grad_w = _accumulate_grad_weight(grad_w, g, h)
                        if grad_b is not None:
                            grad_b += g.float().sum(0)
                    if grad_w is None and ctx.needs_input_grad[1]:
                        grad_w = torch.zeros(weight.shape, dtype=torch.float32,
                                             device=weight.device)
                ctx.save_for_backward(grad_h, grad_w, grad_b)
                ctx.dtypes = (hidden.dtype, weight.dtype,
                              bias.dtype if bias is not None else None)
                return total

            @staticmethod
            def backward(ctx: Any, grad_out: Any) -> Any:
                grad_h, grad_w, grad_b = ctx.saved_tensors
                h_dtype, w_dtype, b_dtype = ctx.dtypes
                gh = (grad_h.float() * grad_out).to(h_dtype) if ctx.needs_input_grad[0] else None
                gw = (grad_w * grad_out).to(w_dtype) if ctx.needs_input_grad[1] else None
                gb = ((grad_b * grad_out).to(b_dtype)
                      if grad_b is not None and ctx.needs_input_grad[2] else None)
                return gh, gw, gb, None, None, None

        cls.fn = LinearCrossEntropySum
        return cls.fn


def fused_linear_cross_entropy_sum(hidden: Any, weight: Any, bias: Any, targets: Any,
                                   chunk: int = FUSED_CHUNK, triton_ce: bool = False) -> Any:
    """``sum(cross_entropy(hidden @ weight.T + bias, targets))``, gradients computed in forward.

    Same value as :func:`trainer_core.loss.linear_cross_entropy_sum`; the logits are computed
    in the autocast dtype (bf16 on CUDA), the softmax in float32. Without grad (evaluation) it
    only computes the loss.
    """
    import torch

    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad
        or (bias is not None and bias.requires_grad))
    if needs_grad:
        return _LinearCrossEntropySum.get().apply(hidden, weight, bias, targets, chunk,
                                                  triton_ce)
    import torch.nn.functional as F

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[i : i + chunk], weight, bias).float()
        total = total + F.cross_entropy(logits, targets[i : i + chunk], reduction="sum")
    return total
