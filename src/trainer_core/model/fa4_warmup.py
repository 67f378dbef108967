"""FlashAttention-4's kernels compiled ahead, in separate processes, while the model loads.

FA4 compiles its kernels (CuTe DSL) at first use: :func:`warm_fa4_kernels` starts two
short-lived processes that compile the forward and the backward kernels into FA4's disk cache;
the first real forward (backward) waits for its process (:func:`wait_for_fa4_warm_up`), then
loads them. Each process runs :func:`trainer_core.model.attention._run_fa4_once`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer_core.files import cache_root

#: The warm-up processes still running, by part ("fwd", "bwd").
_warming: dict[str, Any] = {}


def fa4_cache_env(env: Any) -> Any:
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
    env = fa4_cache_env(dict(os.environ))
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
    _warming.update({
        part: subprocess.Popen(
            [sys.executable, "-c", "from trainer_core.model.attention import _run_fa4_once; "
             f"_run_fa4_once{(*shape, part)!r}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for part in ("fwd", "bwd")})
    return True


def wait_for_fa4_warm_up(part: str) -> None:
    """Let the warm-up process of ``part`` finish, so its kernels load from disk rather than
    compile a second time here."""
    warming = _warming.pop(part, None)
    if warming is not None:
        try:
            warming.wait(timeout=120)
        except subprocess.TimeoutExpired:
            warming.kill()
