"""emoji_think registers in-process and through its installed entry point."""

from __future__ import annotations

import importlib.metadata as md

import pytest
from trainer_emoji_think import plugin
from trainer_emoji_think.profile import EmojiThink

from trainer_core.generation import ForceEndAfterTrigger, TokenPenalty
from trainer_core.testing import (
    ALLOW_ENV,
    build_registry,
    collect_logits_processors,
    get_profile_class,
    get_registry,
    registered_plugin,
    reset_registry,
)


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "")  # only the built-in plugin is discovered
    reset_registry()
    yield
    reset_registry()


def test_registers_in_process():
    assert "emoji_think" not in get_registry().profiles
    with registered_plugin(plugin):
        assert get_profile_class("emoji_think") is EmojiThink
    assert "emoji_think" not in get_registry().profiles


def test_processors_come_fresh_through_the_hook(qwen_tokenizer):
    with registered_plugin(plugin):
        profile = EmojiThink.from_options({})
        first = collect_logits_processors(profile, qwen_tokenizer, None)
        second = collect_logits_processors(profile, qwen_tokenizer, None)
    assert [type(p) for p in first] == [TokenPenalty, ForceEndAfterTrigger]
    assert all(a is not b for a, b in zip(first, second, strict=True))


def test_discovered_through_the_entry_point(monkeypatch):
    try:
        md.distribution("trainer-emoji-think")
    except md.PackageNotFoundError:  # pragma: no cover
        pytest.skip("pip install -e plugins/emoji_think to test discovery")
    monkeypatch.setenv(ALLOW_ENV, "trainer-emoji-think")
    registry = build_registry()
    entry = registry.profiles["emoji_think"]
    assert entry.cls is EmojiThink and entry.distribution == "trainer-emoji-think"
    assert registry.plugins["emoji_think"].status == "ok"
