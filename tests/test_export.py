"""``trainer export`` (issue 29): GGUF files read back with transformers' GGUF loader and
compared with the HF model; clean HF directories; bad input refused with nothing written.

The demo run is the demo model (``trainer_core.demo``'s tiny Qwen3 sizes, real vocabulary)
trained a few steps on the bundled data with the ChatML template. Reading a GGUF with the
151,936-token Qwen3 vocabulary back takes transformers tens of seconds (its ``GGUFReader``
parses the token list in Python), so each file is read once per module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer_core.cli import cli

pytest.importorskip("gguf", reason="pip install 'trainer-core[gguf]'")

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
#: Largest |logit difference| allowed, relative to the largest |logit| of the HF model (README
#: "Export"). f32 is exact; f16 keeps 11 significant bits, bf16 8, q8_0 8 bits per block of 32.
TOLERANCE = {"f32": 1e-6, "f16": 3e-3, "bf16": 3e-2, "q8_0": 5e-2}
TEXTS = ["Hello there, how are you?", "<|im_start|>user\nçava? 👋 12345<|im_end|>\n<think>x</think>",
         "  two spaces\n\n\ttab 3.14159 — dash"]
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


def export_cli(*args: str):
    return CliRunner().invoke(cli, ["export", *args])


def load_gguf(path: Path, config=None):
    """The model transformers rebuilds from ``path`` (float32), and the config it used.

    transformers' GGUF config mapping for ``qwen3`` reads no head size (it maps
    ``attention.key_length`` for qwen3_moe only), so ``Qwen3Config``'s default ``head_dim=128``
    would apply to every file; models whose head size is not 128, like the demo's 32, then
    fail to load. The head size is taken from the file's own ``qwen3.attention.key_length``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.gguf import read_gguf_metadata

    if config is None:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if config.model_type == "qwen3":
            metadata, _ = read_gguf_metadata(str(path))
            config.head_dim = metadata["qwen3.attention.key_length"]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                 dtype=torch.float32)
    return model.eval(), config


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits


def greedy(model, ids, n=8):
    import torch

    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, qwen_tokenizer) -> Path:
    from trainer_core.demo import build_tiny_model, sample_dataset_path

    root = tmp_path_factory.mktemp("export-demo")
    build_tiny_model(seed=0).save_pretrained(root / "base", safe_serialization=True)
    qwen_tokenizer.save_pretrained(root / "base")
    # Enough steps at the demo's learning rate for peaked predictions (a random model's
    # top tokens are too close for a greedy comparison to mean anything).
    result = CliRunner().invoke(cli, [
        "run", "--model", str(root / "base"), "--dataset", str(sample_dataset_path()),
        "--output-dir", str(root / "run"), "--profile", "plain_sft", "--batch-size", "8",
        "--max-steps", "12", "--learning-rate", "3e-3", "--max-length", "256", "--quiet",
        "--save-steps", "6", "--set", "monitoring.num_preview_samples=0",
        "--set", "hyperparams.eval_steps=0", "--set", "hyperparams.warmup_steps=2"])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def demo_hf(demo_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_run, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(demo_run)


@pytest.fixture(scope="module")
def demo_ggufs(demo_run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ggufs")
    files = {}
    for t in GGUF_TYPES:
        files[t] = out / t / f"demo-{t}.gguf"
        files[t].parent.mkdir()
        result = export_cli(str(demo_run), "--to", "gguf", "--type", t, "-o", str(files[t]),
                            "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.output)
        assert summary["bytes"] == files[t].stat().st_size and summary["pre_tokenizer"] == "qwen2"
    return files


@pytest.fixture(scope="module")
def demo_config(demo_ggufs):
    return load_gguf(demo_ggufs["f32"])[1]


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_demo_run_reads_back_with_transformers(demo_ggufs, demo_config, demo_hf, demo_run,
                                               gguf_type):
    import torch
    from transformers.integrations.gguf import read_gguf_metadata

    hf, tok = demo_hf
    metadata, names = read_gguf_metadata(str(demo_ggufs[gguf_type]))
    assert metadata["general.architecture"] == "qwen3"
    assert metadata["tokenizer.ggml.pre"] == "qwen2"
    assert metadata["tokenizer.chat_template"] == \
        (demo_run / "chat_template.jinja").read_text(encoding="utf-8")
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    gguf_model, config = load_gguf(demo_ggufs[gguf_type], demo_config)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == \
        (hf.config.hidden_size, hf.config.num_hidden_layers, hf.config.vocab_size)
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    for text in [prompt, *TEXTS]:
        ids = torch.tensor([tok(text)["input_ids"]])
        want, got = logits(hf, ids), logits(gguf_model, ids)
        error = float((got - want).abs().max() / want.abs().max())
        assert error <= TOLERANCE[gguf_type], (gguf_type, text, error)
    if gguf_type == "f16":
        for text in [prompt, "Once upon a time"]:
            ids = torch.tensor([tok(text)["input_ids"]])
            assert greedy(gguf_model, ids) == greedy(hf, ids), text


@pytest.mark.slow
def test_demo_tokenizer_and_chat_template_read_back(demo_ggufs, demo_hf, demo_run):
    from transformers import AutoTokenizer

    from trainer_core.data.chat import CHATML_JINJA

    _, tok = demo_hf
    path = demo_ggufs["f16"]
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert back.chat_template == CHATML_JINJA  # the run trained with ChatML
    conversation = [*MESSAGES, {"role": "assistant", "content": "4"}]
    assert back.apply_chat_template(conversation, tokenize=False) == \
        tok.apply_chat_template(conversation, tokenize=False)


def test_checkpoint_exports_and_sizes_follow_the_type(demo_run, demo_ggufs, tmp_path):
    from transformers.integrations.gguf import read_gguf_metadata

    sizes = {t: p.stat().st_size for t, p in demo_ggufs.items()}
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"]
    checkpoint = sorted((demo_run / "checkpoints").glob("step-*"))[0]
    out = tmp_path / "ckpt.gguf"
    result = export_cli(str(checkpoint), "--to", "gguf", "-o", str(out))  # default f16
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out} (")
    metadata, _ = read_gguf_metadata(str(out))
    assert metadata["general.file_type"] == 1  # MOSTLY_F16
    assert abs(out.stat().st_size - sizes["f16"]) < 4096  # only general.name differs in length
    assert out.read_bytes() != demo_ggufs["f16"].read_bytes()  # step 6's weights, not the end's


# --------------------------------------------------------------------------- --to hf


def test_to_hf_is_a_clean_model_directory(demo_run, demo_hf, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "clean"
    result = export_cli(str(demo_run), "--to", "hf", "-o", str(out))
    assert result.exit_code == 0, result.output
    from trainer_core.data.tokenizer import TOKENIZER_FILES

    names = {p.name for p in out.iterdir()}
    bookkeeping = {"trainer_config.json", "run.json", "status.json", "metrics.jsonl",
                   "checkpoints"}
    assert bookkeeping <= set(os.listdir(demo_run))
    assert names == {"config.json", "generation_config.json", "model.safetensors",
                     *(set(TOKENIZER_FILES) & set(os.listdir(demo_run)))}
    assert {"tokenizer.json", "chat_template.jinja"} <= names
    for name in names:
        assert (out / name).read_bytes() == (demo_run / name).read_bytes(), name

    cast = tmp_path / "clean-bf16"
    result = export_cli(str(demo_run), "--to", "hf", "--dtype", "bf16", "-o", str(cast))
    assert result.exit_code == 0, result.output
    assert json.loads((cast / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(cast / "model.safetensors"), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}  # noqa: SIM118
    model = AutoModelForCausalLM.from_pretrained(cast, dtype=torch.float32).eval()
    hf, tok = demo_hf
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    want = logits(hf, ids)
    assert float((logits(model, ids) - want).abs().max() / want.abs().max()) <= TOLERANCE["bf16"]


# --------------------------------------------------------------------------- bad input


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_unsupported_architecture_is_refused(micro_model_dir, tmp_path):
    import shutil

    model = tmp_path / "gpt2ish"
    shutil.copytree(micro_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    out = tmp_path / "out.gguf"
    _one_line_error(export_cli(str(model), "--to", "gguf", "-o", str(out)),
                    "GPT2LMHeadModel", "Qwen3ForCausalLM, LlamaForCausalLM")
    _one_line_error(export_cli(str(model), "--to", "hf", "-o", str(tmp_path / "hf")),
                    "GPT2LMHeadModel")
    assert sorted(os.listdir(tmp_path)) == ["gpt2ish"]


def test_unfinished_run_is_refused(demo_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("model.safetensors",
                                                                 "config.json"))
    _one_line_error(export_cli(str(run), "--to", "gguf", "-o", str(tmp_path / "x.gguf")),
                    "no final model", "checkpoints/step-")
    assert not (tmp_path / "x.gguf").exists()


def test_existing_output_is_refused_without_overwrite(micro_model_dir, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    _one_line_error(export_cli(str(micro_model_dir), "--to", "gguf", "-o", str(out)),
                    "already exists", "--overwrite")
    assert out.read_bytes() == b"keep me"
    folder = tmp_path / "hf"
    folder.mkdir()
    _one_line_error(export_cli(str(micro_model_dir), "--to", "hf", "-o", str(folder)),
                    "already exists")
    _one_line_error(export_cli(str(micro_model_dir), "--to", "gguf", "-o", str(folder),
                               "--overwrite"), "is a directory")
    assert folder.is_dir()
    _one_line_error(export_cli(str(micro_model_dir), "--to", "hf", "-o",
                               str(micro_model_dir / "inside")), "outside")
    result = export_cli(str(micro_model_dir), "--to", "gguf", "-o", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(os.listdir(tmp_path)) == ["hf", "out.gguf"]  # no temporary files left


def test_an_error_while_writing_leaves_nothing(micro_model_dir, tmp_path, monkeypatch):
    from trainer_core.export import to_gguf

    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args)

    real = to_gguf._convert
    monkeypatch.setattr(to_gguf, "_convert", failing)
    with pytest.raises(OSError):
        CliRunner().invoke(cli, ["export", str(micro_model_dir), "--to", "gguf", "-o",
                                 str(tmp_path / "out.gguf")], catch_exceptions=False)
    assert len(calls) == 3 and os.listdir(tmp_path) == []  # two tensors were written, then gone


def test_wrong_options_and_tokenizers_are_one_line_errors(micro_model_dir, tmp_path):
    import shutil

    out = tmp_path / "out.gguf"
    _one_line_error(export_cli(str(micro_model_dir), "--to", "gguf", "--dtype", "bf16", "-o",
                               str(out)), "--dtype", "--type")
    _one_line_error(export_cli(str(tmp_path / "nowhere"), "--to", "gguf", "-o", str(out)),
                    "no such directory")
    model = tmp_path / "m"
    shutil.copytree(micro_model_dir, model)
    data = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    _one_line_error(export_cli(str(model), "--to", "gguf", "-o", str(out)),
                    "tokenizer.json", "pre_tokenizer", "Whitespace")
    for name in os.listdir(model):
        if name.startswith("tokenizer"):
            (model / name).unlink()
    _one_line_error(export_cli(str(model), "--to", "hf", "-o", str(tmp_path / "hf")),
                    "no tokenizer files")
    assert sorted(os.listdir(tmp_path)) == ["m"]


# --------------------------------------------------------------------------- Llama, small vocabulary


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, sample_rows) -> Path:
    """A tiny Llama (untied output, grouped-query attention) with its own byte-level BPE
    vocabulary of ~300 tokens, padded to 320 embedding rows: small enough to read back fast."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from trainer_core.data.chat import CHATML_JINJA

    out = tmp_path_factory.mktemp("tiny-llama")
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    texts = [m["content"] for row in sample_rows for m in row["messages"]]
    raw.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>")
    tok.chat_template = CHATML_JINJA
    tok.save_pretrained(out)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
                                   bos_token_id=None, architectures=["LlamaForCausalLM"])
    with torch.random.fork_rng():
        torch.manual_seed(7)
        transformers.LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_llama_reads_back_with_transformers(tiny_llama, tmp_path, gguf_type):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.gguf import read_gguf_metadata

    out = tmp_path / "llama.gguf"
    result = export_cli(str(tiny_llama), "--to", "gguf", "--type", gguf_type, "-o", str(out))
    assert result.exit_code == 0, result.output
    metadata, names = read_gguf_metadata(str(out))
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert "output.weight" in names  # untied
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    back, _ = load_gguf(out)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = torch.tensor([tok(TEXTS[0] + " " + TEXTS[2])["input_ids"]])
    want, got = logits(hf, ids), logits(back, ids)
    # Exact at f32 only if llama.cpp's q/k permutation was applied (transformers undoes it).
    assert float((got - want).abs().max() / want.abs().max()) <= TOLERANCE[gguf_type]
    if gguf_type == "f32":
        gguf_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
        for text in TEXTS:
            assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"], text
        assert gguf_tok.chat_template == (tiny_llama / "chat_template.jinja").read_text()


def test_pre_tokenizer_names_follow_llama_cpp(tmp_path):
    from trainer_core.errors import UserError
    from trainer_core.export.to_gguf import PRE_TOKENIZER_REGEXES, _pre_tokenizer

    def split(regex):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}

    names = {name: regex for regex, name in PRE_TOKENIZER_REGEXES.items()}
    assert _pre_tokenizer(split(names["qwen2"]), tmp_path) == "qwen2"
    assert _pre_tokenizer(split(names["llama-bpe"]), tmp_path) == "llama-bpe"
    smollm = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}
    assert _pre_tokenizer(smollm, tmp_path) == "smollm"
    assert _pre_tokenizer({"type": "ByteLevel", "use_regex": True}, tmp_path) == "gpt-2"
    with pytest.raises(UserError, match="Split"):
        _pre_tokenizer(split(r"\s+"), tmp_path)
