"""The ``qwen_tokenizer`` and ``tiny_qwen3`` fixtures come from ``trainer_core.testing`` (a pytest
plugin that trainer-core installs); this file only gives the tiny model the name these tests use."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tiny_qwen3):
    return tiny_qwen3
