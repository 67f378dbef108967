"""Entry point of the ``trainer-emoji-think`` distribution (group ``trainer``)."""

from __future__ import annotations

from trainer_core import hookimpl
from trainer_emoji_think.profile import EmojiThink


@hookimpl
def register_profiles(register):
    register(EmojiThink)
