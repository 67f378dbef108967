"""A clean Hugging Face directory: weights, config, generation config, tokenizer and chat
template, without a run's bookkeeping (trainer_config.json, run.json, status, metrics,
previews, checkpoints), ready for a user to push to a hub.

Without ``--dtype`` the files are copied byte for byte; with it, floating-point weights are
cast and ``config.json``'s ``dtype`` says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from trainer_core.export import WEIGHTS_INDEX, Source

#: ``--dtype`` -> (torch dtype name, config.json ``dtype``).
HF_DTYPES = {"bf16": ("bfloat16", "bfloat16"), "f16": ("float16", "float16"),
             "f32": ("float32", "float32")}
MODEL_FILES = ("config.json", "generation_config.json")


def write_hf(source: Source, dest: Path, dtype: str | None) -> dict[str, Any]:
    """Write the clean directory ``dest`` (it must not exist yet)."""
    from trainer_core.data.tokenizer import CHAT_TEMPLATES_DIR, TOKENIZER_FILES
    from trainer_core.errors import UserError
    from trainer_core.generate.generate import has_tokenizer

    if not has_tokenizer(source.path):  # a model nobody could prompt
        raise UserError(f"{source.path}: no tokenizer files (tokenizer.json or "
                        "tokenizer_config.json)")
    dest.mkdir()
    copied = [name for name in (*MODEL_FILES, *TOKENIZER_FILES) if (source.path / name).is_file()]
    for name in copied:
        shutil.copyfile(source.path / name, dest / name)
    if (source.path / CHAT_TEMPLATES_DIR).is_dir():
        shutil.copytree(source.path / CHAT_TEMPLATES_DIR, dest / CHAT_TEMPLATES_DIR)
        copied.append(CHAT_TEMPLATES_DIR)
    total = 0
    for file in source.weight_files:
        if dtype is None:
            shutil.copyfile(file, dest / file.name)
        else:
            total += _cast(file, dest / file.name, HF_DTYPES[dtype][0])
        copied.append(file.name)
    if (source.path / WEIGHTS_INDEX).is_file():
        if dtype is None:
            shutil.copyfile(source.path / WEIGHTS_INDEX, dest / WEIGHTS_INDEX)
        else:  # the shards' tensor bytes changed with the cast
            index = json.loads((source.path / WEIGHTS_INDEX).read_text(encoding="utf-8"))
            index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
            (dest / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n",
                                              encoding="utf-8")
        copied.append(WEIGHTS_INDEX)
    if dtype is not None:
        config = dict(source.config, dtype=HF_DTYPES[dtype][1])
        config.pop("torch_dtype", None)  # the older name of the same field
        (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                          encoding="utf-8")
    return {"dtype": dtype, "files": sorted(copied)}


def _cast(src: Path, dest: Path, dtype_name: str) -> int:
    """Write ``src``'s tensors to ``dest`` with floating ones cast; returns their bytes."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, dtype_name)
    tensors = {}
    with safe_open(str(src), framework="pt") as fh:
        metadata = fh.metadata() or {}
        for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
            t = fh.get_tensor(name)
            tensors[name] = t.to(target) if t.is_floating_point() else t
    save_file(tensors, str(dest), metadata={**metadata, "format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())
