"""The core's own plugin: the ``plain_sft`` profile and the bridge that routes a profile's own
``logits_processors`` method through the ``logits_processors`` hook."""

from __future__ import annotations

from typing import Any

from trainer_core import hookimpl
from trainer_core.plugins.profile import PlainSFT


@hookimpl
def register_profiles(register):
    register(PlainSFT)


@hookimpl
def logits_processors(profile: Any, tokenizer: Any, config: Any):
    return profile.logits_processors(tokenizer, config)
