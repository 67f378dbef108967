"""Configs that a directory carries: a run's ``trainer_config.json``, a daemon home's
``config.json``. They describe how the directory was made; they are read to reproduce it, never
to grant it permissions.

Settings in :data:`USER_ONLY` are dropped from such a config: they must come from the user's
own command line or config file. ``model.trust_remote_code`` is the one today: a downloaded run
directory whose ``config.json`` has an ``auto_map`` would otherwise run its own Python files
because its own ``trainer_config.json`` said so.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from trainer_core.config.sources import read_config_file

#: Dotted settings that only the user may set (``section.field``).
USER_ONLY = ("model.trust_remote_code",)


def without_user_only(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config tree without the :data:`USER_ONLY` settings (their defaults apply)."""
    out = copy.deepcopy(tree)
    for dotted in USER_ONLY:
        section, name = dotted.split(".")
        node = out.get(section)
        if isinstance(node, dict):
            node.pop(name, None)
    return out


def read_recorded_config(path: str | Path) -> dict[str, Any]:
    """Read a config a directory carries (see the module docstring), minus :data:`USER_ONLY`.

    Every place that loads a recorded config uses this (``trainer generate``, the daemon's
    reuse of its home's config); pass the user's own values on top with ``resolve(cli=...)``.
    """
    return without_user_only(read_config_file(path))
