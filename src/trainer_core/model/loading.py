"""The model on a device: which model directory, device, precision, loading (local only).

May import: config, plugins, data, demo, errors. Used by generation and training alike.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from trainer_core.config import TrainerConfig
from trainer_core.errors import UserError
from trainer_core.model.speed import plan_speed


def model_directory(cfg: TrainerConfig) -> Path:
    """The configured model directory, or the embedded tiny model (built once, cached)."""
    if cfg.model.path is not None:
        path = Path(cfg.model.path).expanduser()
        if not path.is_dir():
            from trainer_core.files import missing_model_hint

            raise UserError(f"model.path: {path} is not a directory "
                            f"({missing_model_hint(cfg.model.path)})")
        return path
    from trainer_core.demo import ensure_tiny_model

    return ensure_tiny_model(seed=cfg.hyperparams.seed)


def pick_device(cfg: TrainerConfig) -> Any:
    import torch

    want = cfg.environment.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("environment.device: cuda requested but no CUDA device is available")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def pick_precision(cfg: TrainerConfig, device: Any) -> str:
    """auto: bf16 on a GPU that has it, else fp32 (CPU autocast is slower than fp32 here)."""
    import torch

    p = cfg.hyperparams.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if p == "fp16" and device.type != "cuda":
        raise UserError("hyperparams.precision: fp16 needs a CUDA device; use bf16 or fp32")
    return p


def weight_dtype(cfg: TrainerConfig) -> Any:
    """Master weights stay fp32 unless model.dtype says otherwise (mixed precision via autocast)."""
    import torch

    return {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[cfg.model.dtype]


def autocast(device: Any, precision: str) -> Any:
    import torch

    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def quiet_hf() -> None:
    """No hub traffic and no library progress bars: ours is the one the user reads.

    Does not import transformers (a run on cached data is ready before it needs it): when it
    is not imported yet, the environment variables it reads at import say the same."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def check_weight_files(model_dir: str | Path) -> None:
    """Refuse empty or truncated ``*.safetensors`` files with one line, before anything is
    written (no torch needed): the 8-byte header length, the JSON header and the tensors' byte
    ranges must all fit in the file."""
    import json

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if n < 0 or n > size - 8:
                    raise ValueError(f"{size} bytes, no complete header")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
            if 8 + n + end > size:
                raise ValueError(f"{size} bytes, its tensors need {8 + n + end}")
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise UserError(f"{f}: not a complete safetensors file ({exc}); the model "
                            "directory is truncated or damaged") from None


def load_model(model_dir: Path, cfg: TrainerConfig, device: Any, attn: str | None = None,
               extra: dict[str, Any] | None = None) -> Any:
    """The model of ``model_dir`` on ``device``, from local files only.

    ``extra``: more ``from_pretrained`` arguments, e.g. an adapter run's frozen base dtype and
    qlora's 4-bit quantization (``model.adapters.load_kwargs``; with ``device_map`` the model
    is placed on the device as it loads).
    """
    from transformers import AutoModelForCausalLM

    check_weight_files(model_dir)
    quiet_hf()
    kwargs = {"dtype": weight_dtype(cfg), **(extra or {})}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            local_files_only=True,
            trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation=attn or plan_speed(cfg, device).attn_implementation,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model from {model_dir}: {exc}") from exc
    return model if "device_map" in kwargs else model.to(device)


def check_model_locked(model: Any, facts: dict[str, Any]) -> None:
    """The loaded model must be what the lock says (architecture, vocab, context)."""
    from trainer_core.config.lock import mismatches

    mc = model.config
    actual = {
        "model_architecture": (mc.architectures or [type(model).__name__])[0],
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "max_context_length": getattr(mc, "max_position_embeddings", None),
    }
    diffs = mismatches(facts, actual)
    if diffs:
        text = "; ".join(f"{k}: locked {a!r}, model has {b!r}" for k, a, b in diffs)
        raise UserError(f"the loaded model does not match the locked fields: {text}")


def enable_checkpointing(model: Any, layers: int | None = None) -> tuple[int, int]:
    """Gradient checkpointing (non-reentrant) on the first ``layers`` decoder layers of
    ``model`` (``None``: every one); returns how many recompute and how many there are.

    transformers checkpoints each decoder layer on its own flag, so the layers past the
    first ``layers`` keep their activations instead of recomputing them.
    """
    from trainer_core.model.loss import decoder_of

    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    stack = getattr(decoder_of(model), "layers", None)
    if stack is None:
        if layers is not None:
            raise UserError("hyperparams.checkpointed_layers: this model's decoder has no "
                            "`layers` to choose from; leave it null (every layer)")
        return 0, 0
    total = len(stack)
    recomputed = layers_recomputed(layers, total)
    for i, layer in enumerate(stack):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = i < recomputed
    return recomputed, total


def layers_recomputed(checkpointed_layers: int | None, total: int) -> int:
    """How many of ``total`` decoder layers recompute their activations under
    ``hyperparams.checkpointed_layers`` (the first N, capped; ``None``: every one)."""
    return total if checkpointed_layers is None else min(checkpointed_layers, total)


def weights_finite(model: Any) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def fit_to_model(resolved: Any, model_dir: Path) -> TrainerConfig:
    """The config with ``hyperparams.max_length`` checked against the model's context.

    A value the user set above ``max_position_embeddings`` is an error (positions past it were
    never trained); the default is lowered to the model's context instead, and the lowered
    value is what the run records and uses.
    """
    import attrs

    from trainer_core.config.lock import model_facts

    cfg = resolved.config
    context = model_facts(model_dir).get("max_context_length")
    hp = cfg.hyperparams
    if not isinstance(context, int) or hp.max_length <= context:
        return cfg
    if resolved.sources.get("hyperparams.max_length", "default") != "default":
        raise UserError(f"hyperparams.max_length: {hp.max_length} is above the model's "
                        f"max_position_embeddings ({context}); use --max-length {context} or less")
    return attrs.evolve(cfg, hyperparams=attrs.evolve(hp, max_length=context))
