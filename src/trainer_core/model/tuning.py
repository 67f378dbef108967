"""Process set-up for speed: torch.compile's cache folder, compiled decoder blocks, inductor's
mix-order reduction, and the CPU and CUDA allocators.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer_core.files import cache_root


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
    on = (non_strict if switch == "auto" else switch == "on") and non_strict
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
