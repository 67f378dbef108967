"""trainer: plugin-based supervised fine-tuning for chat causal language models.

The public API for plugin authors is what this module exports: ``hookimpl`` to mark hook
implementations, ``Profile`` and ``NoOptions`` to write profiles, ``UserError`` for clear
user-facing failures, and ``load_config`` for services that drive runs programmatically.
Everything here imports without torch or transformers, so the CLI starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

import pluggy

#: Marker for hook implementations in plugins: ``@trainer_core.hookimpl``.
hookimpl = pluggy.HookimplMarker("trainer")

from trainer_core.errors import UserError  # noqa: E402
from trainer_core.profiles import Example, NoOptions, Profile  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from trainer_core.config import TrainerConfig, load_config

__all__ = [
    "__version__",
    "hookimpl",
    "UserError",
    "Profile",
    "NoOptions",
    "Example",
    "TrainerConfig",
    "load_config",
]


def __getattr__(name: str) -> Any:
    # Config pulls in cattrs; keep ``import trainer_core`` cheap for plugins.
    if name in ("TrainerConfig", "load_config"):
        from trainer_core import config

        return getattr(config, name)
    raise AttributeError(name)
