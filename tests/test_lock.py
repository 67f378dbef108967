"""The lock file that ties an output directory to one base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer_core.config import from_dict
from trainer_core.config.lock import (
    LOCK_FILE,
    check_and_write_lock,
    check_model_against_config,
    expected_facts,
    model_facts,
)
from trainer_core.errors import UserError

FACTS = {
    "base_model": "acme/tiny-chat",
    "model_architecture": "Qwen3ForCausalLM",
    "max_context_length": 4096,
    "vocab_size": 151936,
    "model_version": None,
}


def read_lock(out: Path) -> dict:
    return json.loads((out / LOCK_FILE).read_text(encoding="utf-8"))


def write_model(tmp_path: Path, data: dict) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(data), encoding="utf-8")
    return model


def test_first_call_writes_the_lock(tmp_path):
    out = tmp_path / "run" / "nested"  # created as needed
    check_and_write_lock(out, FACTS)
    assert read_lock(out) == FACTS
    assert not list(out.glob("*.tmp"))


def test_same_facts_pass_and_leave_the_lock_alone(tmp_path):
    check_and_write_lock(tmp_path, FACTS)
    before = (tmp_path / LOCK_FILE).read_bytes()
    check_and_write_lock(tmp_path, dict(FACTS))
    assert (tmp_path / LOCK_FILE).read_bytes() == before


def test_unset_facts_are_not_mismatches(tmp_path):
    check_and_write_lock(tmp_path, FACTS)
    check_and_write_lock(tmp_path, {**FACTS, "model_version": "v2", "vocab_size": None})
    assert read_lock(tmp_path) == FACTS


def test_differing_facts_fail_listing_each_field(tmp_path):
    check_and_write_lock(tmp_path, FACTS)
    new = {**FACTS, "base_model": "acme/other", "vocab_size": 32000}
    with pytest.raises(UserError) as info:
        check_and_write_lock(tmp_path, new)
    msg = str(info.value)
    assert "base_model: 'acme/tiny-chat' -> 'acme/other'" in msg
    assert "vocab_size: 151936 -> 32000" in msg
    assert "max_context_length" not in msg and "model_architecture" not in msg
    # Both ways out are named.
    assert "--output-dir" in msg and "--unlock" in msg
    assert str(tmp_path) in msg
    assert "\n" not in msg
    assert read_lock(tmp_path) == FACTS  # untouched


def test_unlock_overwrites(tmp_path):
    check_and_write_lock(tmp_path, FACTS)
    new = {**FACTS, "vocab_size": 32000, "model_architecture": "LlamaForCausalLM"}
    check_and_write_lock(tmp_path, new, unlock=True)
    assert read_lock(tmp_path) == new
    check_and_write_lock(tmp_path, new)  # now the new model is the locked one
    with pytest.raises(UserError, match=r"vocab_size: 32000 -> 151936"):
        check_and_write_lock(tmp_path, FACTS)


def test_unreadable_lock(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{nope", encoding="utf-8")
    with pytest.raises(UserError, match="unreadable lock file"):
        check_and_write_lock(tmp_path, FACTS)


def test_model_facts_from_config_json(tmp_path):
    model = write_model(tmp_path, {"architectures": ["Qwen3ForCausalLM"],
                                   "max_position_embeddings": 40960, "vocab_size": 151936,
                                   "hidden_size": 1024})
    assert model_facts(model) == {"model_architecture": "Qwen3ForCausalLM",
                                  "max_context_length": 40960, "vocab_size": 151936}


def test_model_facts_nested_text_config(tmp_path):
    model = write_model(tmp_path, {"architectures": ["Gemma3ForConditionalGeneration"],
                                   "text_config": {"max_position_embeddings": 8192,
                                                   "vocab_size": 262208}})
    assert model_facts(model) == {"model_architecture": "Gemma3ForConditionalGeneration",
                                  "max_context_length": 8192, "vocab_size": 262208}


def test_model_facts_missing_or_bad(tmp_path):
    with pytest.raises(UserError, match="not found; model.path must be a local model directory"):
        model_facts(tmp_path)
    (tmp_path / "config.json").write_text("{", encoding="utf-8")
    with pytest.raises(UserError, match="cannot read model config"):
        model_facts(tmp_path)


def test_expected_facts_prefer_the_users_locked_values(tmp_path):
    model = write_model(tmp_path, {"architectures": ["Qwen3ForCausalLM"],
                                   "max_position_embeddings": 40960, "vocab_size": 151936})
    cfg = from_dict({"locked": {"max_context_length": 2048, "model_version": "2025-01"},
                     "hyperparams": {"max_length": 1024}})
    assert expected_facts(cfg, model, "acme/base") == {
        "base_model": "acme/base",
        "model_architecture": "Qwen3ForCausalLM",
        "max_context_length": 2048,
        "vocab_size": 151936,
        "model_version": "2025-01",
    }


def test_check_model_against_config():
    facts = {"model_architecture": "Qwen3ForCausalLM", "max_context_length": 40960,
             "vocab_size": 151936}
    check_model_against_config(from_dict({}), facts)  # nothing locked: fine
    check_model_against_config(from_dict({"locked": {"vocab_size": 151936}}), facts)
    cfg = from_dict({"locked": {"vocab_size": 32000, "model_architecture": "LlamaForCausalLM",
                                "max_context_length": 40960}})
    with pytest.raises(UserError) as info:
        check_model_against_config(cfg, facts)
    assert str(info.value) == (
        "the model does not match the locked config: "
        "locked.model_architecture='LlamaForCausalLM' but the model has 'Qwen3ForCausalLM', "
        "locked.vocab_size=32000 but the model has 151936"
    )
