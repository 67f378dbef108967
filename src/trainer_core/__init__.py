"""trainer: plugin-based supervised fine-tuning for chat causal language models.

This module is the public API for plugin authors, and only it: ``hookimpl`` to mark hook
implementations; ``Profile``, ``NoOptions`` and ``Example`` to write profiles; ``check``,
``one_of``, ``apply_system_prompt`` and ``SYSTEM_PROMPT_MODES`` to write their options and
transforms; ``UserError`` for clear user-facing failures; ``load_config`` and ``TrainerConfig``
for services that drive runs programmatically. Two more public modules: ``trainer_core.generation``
(logits-processor building blocks) and ``trainer_core.testing`` (pytest fixtures and helpers).
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
from trainer_core.plugins.profile import (  # noqa: E402
    SYSTEM_PROMPT_MODES,
    Example,
    NoOptions,
    Profile,
    apply_system_prompt,
)

if TYPE_CHECKING:  # pragma: no cover
    from trainer_core.config import TrainerConfig, load_config

__all__ = [
    "__version__",
    "hookimpl",
    "UserError",
    "Profile",
    "NoOptions",
    "Example",
    "SYSTEM_PROMPT_MODES",
    "apply_system_prompt",
    "check",
    "one_of",
    "TrainerConfig",
    "load_config",
]


def __getattr__(name: str) -> Any:
    # Resolution pulls in more of the config layer than a plugin import needs.
    if name in ("TrainerConfig", "load_config"):
        from trainer_core import config

        return getattr(config, name)
    raise AttributeError(name)
