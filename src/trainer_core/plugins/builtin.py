"""The core's own plugin: the ``plain_sft`` profile.

A profile's own logits processors come from ``Profile.logits_processors`` directly (see
``collect_logits_processors``); the ``logits_processors`` hook is only for processors that
plugins add to any profile.
"""

from __future__ import annotations

from trainer_core import hookimpl
from trainer_core.plugins.profile import PlainSFT


@hookimpl
def register_profiles(register):
    register(PlainSFT)
