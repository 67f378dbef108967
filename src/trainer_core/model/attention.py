"""The varlen attention: packed rows attended example by example, with no mask.

A packed row holds many examples. The loss passes each micro-batch's cumulative example
lengths (``trainer_cu_seqlens``) down to every layer, and :func:`varlen_attention_forward`
(registered with transformers as :data:`VARLEN_ATTN`) runs PyTorch's FlashAttention-2 varlen
kernel, or FlashAttention-4's (:func:`_flash4_varlen_op`, ``environment.attention_kernel``), as
a custom op that compiled blocks call as is. Without those lengths (generation, padded batches)
it falls back to plain sdpa with transformers' masks. On the CPU, :func:`varlen_reference` is
the same attention in plain sdpa (tests, and the correctness reference of the benches).
"""

from __future__ import annotations

import os
from typing import Any

from trainer_core.errors import UserError
from trainer_core.model.fa4_warmup import fa4_cache_env, wait_for_fa4_warm_up

#: Name under which the varlen attention is registered with transformers.
VARLEN_ATTN = "trainer_varlen"


_state: dict[str, Any] = {"skip_masks": False, "registered": False}


class _skip_masks:
    """While active, the varlen attention's mask builder returns no mask (lengths are passed)."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.old = False

    def __enter__(self) -> None:
        self.old = _state["skip_masks"]
        _state["skip_masks"] = self.active or self.old

    def __exit__(self, *exc: Any) -> None:
        _state["skip_masks"] = self.old


def varlen_kwargs(seq_lens: list[int], device: Any) -> dict[str, Any]:
    """Per-micro-batch attention kwargs: cumulative lengths (int32) and the longest example."""
    import torch

    cu = [0]
    for n in seq_lens:
        cu.append(cu[-1] + int(n))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    if getattr(device, "type", str(device)) == "cuda":
        cu_t = cu_t.pin_memory().to(device, non_blocking=True)
    else:
        cu_t = cu_t.to(device)
    return {"trainer_cu_seqlens": cu_t, "trainer_max_seqlen": max(int(n) for n in seq_lens)}


def varlen_available() -> bool:
    """FlashAttention varlen kernels in this torch build, on a CUDA device (sm80+)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        if torch.cuda.get_device_capability()[0] < 8:
            return False
        return hasattr(torch.ops.aten, "_flash_attention_forward") and hasattr(
            torch.ops.aten, "_flash_attention_backward")
    except Exception:  # pragma: no cover - odd builds
        return False


_flash_op: dict[str, Any] = {}


def _flash_varlen_op() -> Any:
    """A custom op around aten's FlashAttention-2 varlen forward, with its backward registered.

    A custom op keeps the kernel opaque to torch.compile (compiled blocks call it as is) and
    works the same eagerly.
    """
    if "fwd" in _flash_op:
        return _flash_op["fwd"]
    import torch

    def window(left: int) -> dict[str, Any]:
        if left < 0:
            return {}
        return {"window_size_left": left, "window_size_right": 0}

    # The schema is spelled out: this module's annotations are strings (no torch at import).
    @torch.library.custom_op(
        "trainer::flash_varlen", mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, Tensor cu, SymInt max_len, float scale, "
               "int window_left) -> (Tensor, Tensor, Tensor, Tensor)")
    def flash_varlen(q, k, v, cu, max_len, scale, window_left):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale,
            **window(window_left))
        return out, lse, seed.clone(), offset.clone()

    @flash_varlen.register_fake
    def _(q, k, v, cu, max_len, scale, window_left):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale,
            **window(window_left))
        return out, lse, torch.empty_like(seed), torch.empty_like(offset)

    def setup_context(ctx, inputs, output):
        q, k, v, cu, max_len, scale, window_left = inputs
        out, lse, seed, offset = output
        ctx.save_for_backward(q, k, v, cu, out, lse, seed, offset)
        ctx.max_len, ctx.scale, ctx.window_left = max_len, scale, window_left

    def backward(ctx, grad_out, _g_lse, _g_seed, _g_offset):
        q, k, v, cu, out, lse, seed, offset = ctx.saved_tensors
        wl = ctx.window_left
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0,
            True, seed, offset, scale=ctx.scale, **window(wl))
        return dq, dk, dv, None, None, None, None

    flash_varlen.register_autograd(backward, setup_context=setup_context)
    _flash_op["fwd"] = flash_varlen
    return flash_varlen


def fa4_available() -> bool:
    """FlashAttention-4 (the ``flash-attn-4`` wheel) importable, on a Hopper GPU (sm90).

    Its kernels are written in CuTe DSL and compiled at first use; sm90 is the architecture
    they were measured on here (docs/throughput.md), so ``auto`` picks them only there.
    """
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
            return False
        import importlib.util

        if importlib.util.find_spec("flash_attn.cute") is None:
            return False
        _flash4_varlen_op()  # imports it: a broken install (say, no CUDA libraries) is "no"
        return True
    except Exception:  # pragma: no cover - a half-installed flash_attn package
        return False


def _flash4_varlen_op() -> Any:
    """The same op as :func:`_flash_varlen_op` on FlashAttention-4's varlen kernels.

    Same schema (out first), so the attention forward swaps one for the other. FA4's own
    autograd function is not used: dynamo would trace into it inside the compiled blocks.
    """
    if "fa4" in _flash_op:
        return _flash_op["fa4"]
    import torch

    fa4_cache_env(os.environ)
    from flash_attn.cute import interface as fa4

    def window(left: int) -> dict[str, Any]:
        return {} if left < 0 else {"window_size_left": left, "window_size_right": 0}

    def forward(q, k, v, cu, max_len, scale, window_left):
        wait_for_fa4_warm_up("fwd")
        out, lse = fa4._flash_attn_fwd(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
            max_seqlen_k=max_len, softmax_scale=scale, causal=True, return_lse=True,
            **window(window_left))[:2]
        return out, lse

    @torch.library.custom_op(
        "trainer::flash4_varlen", mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, Tensor cu, SymInt max_len, float scale, "
               "int window_left) -> (Tensor, Tensor)")
    def flash4_varlen(q, k, v, cu, max_len, scale, window_left):
        return forward(q, k, v, cu, max_len, scale, window_left)

    @flash4_varlen.register_fake
    def _(q, k, v, cu, max_len, scale, window_left):
        # varlen shapes: out [T, H, Dv], log-sum-exp [H, T] in float32
        return (q.new_empty((*q.shape[:-1], v.shape[-1])),
                q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))

    def setup_context(ctx, inputs, output):
        q, k, v, cu, max_len, scale, window_left = inputs
        ctx.save_for_backward(q, k, v, cu, *output)
        ctx.max_len, ctx.scale, ctx.window_left = max_len, scale, window_left

    # The backward is an op of its own too: compiled autograd traces it with fake tensors.
    @torch.library.custom_op(
        "trainer::flash4_varlen_bwd", mutates_args=(),
        schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
               "Tensor cu, SymInt max_len, float scale, int window_left) -> (Tensor, Tensor, Tensor)")
    def flash4_varlen_bwd(grad_out, q, k, v, out, lse, cu, max_len, scale, window_left):
        wait_for_fa4_warm_up("bwd")
        return tuple(fa4._flash_attn_bwd(
            q, k, v, out, grad_out.contiguous(), lse, scale, True, cu_seqlens_q=cu,
            cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
            **window(window_left))[:3])

    @flash4_varlen_bwd.register_fake
    def _(grad_out, q, k, v, out, lse, cu, max_len, scale, window_left):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def backward(ctx, grad_out, _g_lse):
        q, k, v, cu, out, lse = ctx.saved_tensors
        dq, dk, dv = flash4_varlen_bwd(grad_out, q, k, v, out, lse, cu, ctx.max_len,
                                       ctx.scale, ctx.window_left)
        return dq, dk, dv, None, None, None, None

    flash4_varlen.register_autograd(backward, setup_context=setup_context)
    _flash_op["fa4"] = flash4_varlen
    return flash4_varlen


def _run_fa4_once(heads: int, kv_heads: int, dim: int, part: str) -> None:
    """One varlen forward (``part`` "fwd") or backward ("bwd", on random forward results: the
    kernels do not depend on the values) through the FA4 ops: a warm-up process's body."""
    import torch

    op = _flash4_varlen_op()
    q, k, v = (torch.randn(1024, h, dim, device="cuda", dtype=torch.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, 384, 1024], dtype=torch.int32, device="cuda")
    if part == "fwd":
        op(q, k, v, cu, 1024, dim ** -0.5, -1)
    else:
        lse = torch.zeros(heads, 1024, device="cuda", dtype=torch.float32)
        torch.ops.trainer.flash4_varlen_bwd(torch.randn_like(q), q, k, v, torch.randn_like(q),
                                            lse, cu, 1024, dim ** -0.5, -1)
    torch.cuda.synchronize()


def varlen_reference(q: Any, k: Any, v: Any, cu: Any, scale: float) -> Any:
    """Per-example causal sdpa over ``[T, H, D]`` tensors (CPU path and correctness reference)."""
    import torch
    import torch.nn.functional as F

    outs = []
    bounds = cu.tolist()
    groups = q.shape[1] // k.shape[1]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b == a:
            continue
        qi, ki, vi = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        if groups > 1:
            ki = ki.repeat_interleave(groups, dim=1)
            vi = vi.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def varlen_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                             dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, **kwargs: Any
                             ) -> tuple[Any, None]:
    """transformers attention interface: ``[B, H, T, D]`` in, ``[B, T, H, D]`` out."""
    import torch

    cu = kwargs.get("trainer_cu_seqlens")
    if cu is None or query.shape[0] != 1:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, **kwargs)
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    dev = q.device.type
    if dev == "cuda":
        dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype)
        if dtype not in (torch.float16, torch.bfloat16):
            dtype = torch.bfloat16
        q, k, v = (x.to(dtype) for x in (q, k, v))
        window_left = int(sliding_window) - 1 if sliding_window else -1
        op = _state.get("op") or _flash_varlen_op()
        out = op(q, k, v, cu, kwargs["trainer_max_seqlen"], scale, window_left)[0]
    else:
        if sliding_window:
            raise NotImplementedError("varlen reference attention: no sliding window")
        out = varlen_reference(q, k, v, cu, scale)
    return out.unsqueeze(0), None


def _varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """Masks for the varlen attention: none when lengths are passed, else what sdpa uses."""
    if _state["skip_masks"]:
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def attention_kernel(switch: str) -> str:
    """``environment.attention_kernel`` resolved on this machine: ``fa2`` or ``fa4``."""
    if switch == "fa2" or (switch == "auto" and not fa4_available()):
        return "fa2"
    if not fa4_available():
        raise UserError("environment.attention_kernel: fa4 needs a Hopper GPU and the "
                        "flash-attn-4 package (pip install 'trainer-core[fa4]'); use auto or fa2")
    return "fa4"


def register_varlen_attention(kernel: str = "fa2") -> str:
    """Register the varlen attention (and its mask builder) with transformers; idempotent.

    ``kernel`` (``fa2`` or ``fa4``) picks the op every later varlen call runs.
    """
    if not _state["registered"]:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
        AttentionMaskInterface.register(VARLEN_ATTN, _varlen_mask)
        _state["registered"] = True
    # Create the op now: defining it inside a compiled block breaks it.
    _state["op"] = _flash4_varlen_op() if kernel == "fa4" else _flash_varlen_op()
    return VARLEN_ATTN
