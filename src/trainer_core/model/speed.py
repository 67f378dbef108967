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
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from trainer_core.config import TrainerConfig
from trainer_core.errors import UserError
from trainer_core.files import cache_root

#: Name under which the varlen attention is registered with transformers.
VARLEN_ATTN = "trainer_varlen"
#: Rows per lm_head chunk in the fused loss: 8192 x 151,936 bf16 logits is ~2.5 GB.
FUSED_CHUNK = 8192


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


# --------------------------------------------------------------------------- the loss


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


# --------------------------------------------------------------------------- varlen attention

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

    _fa4_cache_env(os.environ)
    from flash_attn.cute import interface as fa4

    def window(left: int) -> dict[str, Any]:
        return {} if left < 0 else {"window_size_left": left, "window_size_right": 0}

    def forward(q, k, v, cu, max_len, scale, window_left):
        _wait_for_fa4_warm_up("fwd")
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
        _wait_for_fa4_warm_up("bwd")
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


def _fa4_cache_env(env: Any) -> Any:
    """FA4 compiles its kernels at first use; keep them next to inductor's (read at import)."""
    env.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    env.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(cache_root() / "fa4"))
    return env


def warm_fa4_kernels(model_dir: Path) -> bool:
    """Compile FA4's kernels for this model's attention shape in separate processes, now.

    On a machine where FA4 never ran, its first forward and backward compile for ~7 s
    (H200, measured), on top of the decoder blocks' compilation. Started before the model
    loads, two short-lived processes compile them into FA4's disk cache meanwhile, one the
    forward kernel and one the backward kernels; the first real forward (backward) waits for
    its process, then loads them. Separate processes, because these compilers are mostly
    Python and would take turns on one interpreter. Only where FA4's cache holds no compiled
    kernel yet (waiting for a process that only loads cached kernels would slow a warm start),
    and only on local rank 0.
    """
    env = _fa4_cache_env(dict(os.environ))
    cache = Path(env["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"])
    # Kernels, not folders: importing FA4 (which choosing the attention kernel does, before
    # this) creates its cache's empty per-kernel folders.
    if os.environ.get("LOCAL_RANK", "0") != "0" or any(cache.rglob("*.o")):
        return False
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        heads = int(cfg["num_attention_heads"])
        shape = (heads, int(cfg.get("num_key_value_heads") or heads),
                 int(cfg.get("head_dim") or cfg["hidden_size"] // heads))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    _state["fa4_warm"] = {
        part: subprocess.Popen(
            [sys.executable, "-c", "from trainer_core.model.speed import _run_fa4_once; "
             f"_run_fa4_once{(*shape, part)!r}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for part in ("fwd", "bwd")}
    return True


def _wait_for_fa4_warm_up(part: str) -> None:
    """Let the warm-up process of ``part`` finish, so its kernels load from disk rather than
    compile a second time here."""
    warming = _state.get("fa4_warm", {}).pop(part, None)
    if warming is not None:
        try:
            warming.wait(timeout=120)
        except subprocess.TimeoutExpired:
            warming.kill()


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


# --------------------------------------------------------------------------- compilation


def persist_compile_cache() -> Path | None:
    """Keep torch.compile's caches in ``<trainer cache>/inductor`` unless the user chose a place.

    Inductor's default is a folder under /tmp, gone after a reboot (or a fresh container);
    kept with the trainer's other caches, a second run of the same shape reuses the compiled
    kernels and autotuning and reaches its first step in seconds (docs/throughput.md).
    """
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    path = cache_root() / "inductor"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache folder only costs the warm start
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_blocks(model: Any, mix_order: str = "auto") -> Any:
    """Compile each decoder layer in place (state-dict names and saving are unchanged).

    ``mix_order`` is ``environment.mix_order_reduction`` (see :func:`set_mix_order_reduction`).
    """
    import torch

    persist_compile_cache()

    from trainer_core.model.loss import decoder_of

    dyn = torch._dynamo.config
    # All layers share one compiled graph; allow room for the dynamic-shape recompile and for
    # models whose layers differ (e.g. sliding/full alternation).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dyn, name):
            setattr(dyn, name, max(getattr(dyn, name), 64))
    if hasattr(dyn, "accumulated_recompile_limit"):
        dyn.accumulated_recompile_limit = max(dyn.accumulated_recompile_limit, 512)
    set_mix_order_reduction(mix_order)
    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        return model
    for layer in layers:
        # Static first, dynamic from the first new length (torch's default): a dynamic first
        # compile was measured 6-8 s slower to the first step (bench/throughput.py).
        layer.compile()
    return model


def set_mix_order_reduction(switch: str) -> bool:
    """Configure inductor's mix-order reduction fusion; True if it is on.

    The fusion computes a norm backward's per-token sum and its over-tokens sum (the weight
    gradient) in one pass. In its default, strict mode inductor decides by thresholds on the
    sequence length (>= 4,096 rows, >= 5 M elements...), and each decision is a guard: a packed
    row crossing one recompiled the blocks (seconds each, at random steps of a run). The
    non-strict mode skips those checks, so one dynamic graph serves every length; without it
    the fusion stays off.
    """
    import torch._inductor.config as inductor_config

    triton_cfg: Any = getattr(inductor_config, "triton", None)
    if triton_cfg is None or not hasattr(triton_cfg, "mix_order_reduction"):
        return False
    non_strict = hasattr(triton_cfg, "mix_order_reduction_non_strict_mode")
    on = _on(switch, non_strict) and non_strict
    triton_cfg.mix_order_reduction = on
    if non_strict:
        triton_cfg.mix_order_reduction_non_strict_mode = on
    return on


def tune_cpu_allocator(threshold: int = 1 << 30) -> bool:
    """Make glibc keep large freed blocks for reuse instead of unmapping them; True if applied.

    CPU training of a 152k-vocabulary model allocates and frees tensors of tens to hundreds
    of MB every step (the embedding gradient, logits, optimizer temporaries). By default glibc
    serves each allocation above 32 MB with a fresh ``mmap`` and unmaps it on free, so every
    step pays page faults and zeroing for all of them; on the 2-core demo machine that was
    about half of each step's time (bench/demo_model.py, ``--mallopt``). Raising the mmap and
    trim thresholds lets freed memory be reused. Process-wide; a no-op off glibc.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    value = ctypes.c_int(min(threshold, 2**31 - 1))
    return bool(mallopt(m_mmap_threshold, value)) and bool(mallopt(m_trim_threshold, value))


def tune_cuda_allocator() -> bool:
    """Let PyTorch's CUDA allocator grow segments instead of caching fixed blocks; True if set.

    Packed rows change length every step, so fixed-size cached blocks fragment: a 64-example
    step (~35k tokens) of the 0.6B model on an 80 GB H100 ran out of memory with 16 GiB
    reserved but unusable (bench/throughput.py, measured). Expandable segments map more
    memory into one segment as needed; set at run time, they apply to the segments reserved
    from then on. A ``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF`` the user set is kept.
    """
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return False
    import torch

    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    return True
