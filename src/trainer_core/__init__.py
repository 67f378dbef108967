"""trainer: plugin-based supervised fine-tuning for chat causal language models.

This module is the public API for plugin authors, and only it: ``hookimpl`` to mark hook
implementations; ``Profile``, ``NoOptions`` and ``Example`` to write profiles; ``AnswerFormat`` (a profile's
answer format) and ``check_answer`` (does a text match it); ``check``,
``one_of``, ``apply_system_prompt`` and ``SYSTEM_PROMPT_MODES`` to write their options and
transforms; ``UserError`` for clear user-facing failures; ``load_config`` and ``TrainerConfig``
for services that drive runs programmatically (``parse_set`` reads ``--set key=value`` as
``trainer`` does); for command plugins, ``load_rows(cfg)`` (the training and validation rows
exactly as ``trainer run`` reads them, before the profile), ``prepare_rows(cfg)`` (the rows after
the profile, as training sees them), ``profile_rng(seed, index)`` (the rng a row's ``transform``
gets), ``build_profile(cfg)`` (the configured profile) and ``sample_dataset_path()`` (the bundled
demo data). Two more public modules: ``trainer_core.generation`` (logits-processor building
blocks) and ``trainer_core.testing`` (pytest fixtures and helpers).
Everything else is internal and may change. Importing this module does not import torch or
transformers, so the CLI starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

import pluggy

#: Marker for hook implementations in plugins: ``@trainer_core.hookimpl``.
hookimpl = pluggy.HookimplMarker("trainer")

from trainer_core.config.structure import check, one_of  # noqa: E402
from trainer_core.errors import UserError  # noqa: E402
from trainer_core.plugins.answer_format import AnswerFormat, check_answer  # noqa: E402
from trainer_core.plugins.profile import (  # noqa: E402
    SYSTEM_PROMPT_MODES,
    Example,
    NoOptions,
    Profile,
    apply_system_prompt,
)

if TYPE_CHECKING:  # pragma: no cover
    from trainer_core.config import TrainerConfig, parse_set
    from trainer_core.data.preprocess import example_rng as profile_rng
    from trainer_core.demo import sample_dataset_path
    from trainer_core.plugins.registry import build_profile
    from trainer_core.train.inputs import load_config, load_rows, prepare_rows

__all__ = [
    "__version__",
    "hookimpl",
    "UserError",
    "Profile",
    "AnswerFormat",
    "check_answer",
    "NoOptions",
    "Example",
    "SYSTEM_PROMPT_MODES",
    "apply_system_prompt",
    "check",
    "one_of",
    "TrainerConfig",
    "load_config",
    "parse_set",
    "load_rows",
    "prepare_rows",
    "profile_rng",
    "build_profile",
    "sample_dataset_path",
]

#: Public names resolved on first use (they pull in more than a plugin import needs):
#: name -> (module, attribute).
_LAZY = {
    "TrainerConfig": ("trainer_core.config", "TrainerConfig"),
    # trainer run's resolution (demo preset, --set strings) plus the profile.options check.
    "load_config": ("trainer_core.train.inputs", "load_config"),
    "parse_set": ("trainer_core.config", "parse_set"),
    # (train_rows, validation_rows, skipped counts by reason): validated per data.on_invalid,
    # split per data.validation / data.validation_split; each row keeps its line in "_line".
    "load_rows": ("trainer_core.train.inputs", "load_rows"),
    "prepare_rows": ("trainer_core.train.inputs", "prepare_rows"),
    "profile_rng": ("trainer_core.data.preprocess", "example_rng"),
    "build_profile": ("trainer_core.plugins.registry", "build_profile"),
    "sample_dataset_path": ("trainer_core.demo", "sample_dataset_path"),
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'trainer_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(target[0]), target[1])


def __dir__() -> list[str]:
    # The lazy names too, so autocompletion offers them before their first use.
    return sorted(set(globals()) | set(_LAZY))
