"""Output fidelity: a saved model differs from its base only by its weights and the training chat
template; ``trainer generate`` renders like training and scales (issue 15)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer_core.cli import cli
from trainer_core.data.chat import CHATML_JINJA, encode, render, render_generation_prompt
from trainer_core.data.tokenizer import TOKENIZER_FILES, load_tokenizer, save_tokenizer

#: config.json fields a saved model may legitimately change (README "Output fidelity").
DOCUMENTED_CONFIG_CHANGES = {"transformers_version", "dtype"}
JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\nAnswer: {% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! 👋"},
                {"role": "user", "content": "Name a colour."}]


def _train(model_dir, data, out, *extra):
    args = ["run", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out),
            "--profile", "plain_sft", "--batch-size", "4", "--max-steps", "2", "--quiet",
            "--set", "monitoring.num_preview_samples=1", "--set", "monitoring.max_new_tokens=4",
            "--set", "hyperparams.eval_steps=0", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def chatml_run(micro_model_dir, tmp_path_factory):
    """A run from a base directory whose own template is Qwen3's, trained with ChatML."""
    from trainer_core.demo import sample_dataset_path

    root = tmp_path_factory.mktemp("chatml-run")
    os.environ.setdefault("TRAINER_CACHE", str(root / "cache"))
    # Gradient checkpointing on: what training switches in the model must not reach the output.
    return _train(micro_model_dir, sample_dataset_path(), root / "run",
                  "--set", "hyperparams.gradient_checkpointing=true")


@pytest.fixture(scope="module")
def jinja_run(micro_model_dir, tmp_path_factory):
    """A run trained with a Jinja template file, checkpointing after step 1."""
    from trainer_core.demo import sample_dataset_path

    root = tmp_path_factory.mktemp("jinja-run")
    template = root / "template.jinja"
    template.write_text(JINJA, encoding="utf-8")
    out = _train(micro_model_dir, sample_dataset_path(), root / "run", "--chat-template",
                 str(template), "--save-steps", "1")
    template.unlink()  # generation must not depend on the file still being there
    return out


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_saved_model_differs_from_its_base_only_by_weights_and_template(micro_model_dir,
                                                                        chatml_run):
    base, out = micro_model_dir, chatml_run
    base_cfg, out_cfg = _json(base / "config.json"), _json(out / "config.json")
    changed = {k for k in base_cfg.keys() | out_cfg.keys() if base_cfg.get(k) != out_cfg.get(k)}
    assert changed <= DOCUMENTED_CONFIG_CHANGES, changed
    assert out_cfg["use_cache"] is True  # training turns it off; the saved model must not
    assert (out / "generation_config.json").read_bytes() == \
        (base / "generation_config.json").read_bytes()
    for name in TOKENIZER_FILES:
        if (base / name).is_file() and name != "chat_template.jinja":
            assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == CHATML_JINJA
    assert (out / "model.safetensors").read_bytes() != (base / "model.safetensors").read_bytes()


def test_saved_tokenizer_reproduces_the_base_tokenization(micro_model_dir, chatml_run):
    import tokenizers
    from transformers import AutoTokenizer

    texts = ["Hi", "Hello there friend", "<|im_start|>user\nçava? 👋<|im_end|>\n"]
    raw_base = tokenizers.Tokenizer.from_file(str(micro_model_dir / "tokenizer.json"))
    raw_out = tokenizers.Tokenizer.from_file(str(chatml_run / "tokenizer.json"))
    assert raw_out.padding is None
    assert [e.ids for e in raw_out.encode_batch(texts)] == \
        [e.ids for e in raw_base.encode_batch(texts)]
    assert len({len(e.ids) for e in raw_out.encode_batch(texts)}) == 3  # nothing padded

    base = AutoTokenizer.from_pretrained(micro_model_dir)
    out = AutoTokenizer.from_pretrained(chatml_run)
    assert out.padding_side == base.padding_side == "right"
    assert out(texts)["input_ids"] == base(texts)["input_ids"]
    assert out(texts, padding=True)["input_ids"] == base(texts, padding=True)["input_ids"]
    assert (out.pad_token, out.eos_token) == (base.pad_token, base.eos_token)


def test_saved_chat_template_formats_prompts_exactly_as_training(chatml_run, qwen_tokenizer):
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(chatml_run)
    conversation = [*CONVERSATION, {"role": "assistant", "content": "Blue."}]
    assert out.apply_chat_template(conversation, tokenize=False) == \
        render(conversation, "chatml", qwen_tokenizer)
    assert out.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == \
        render_generation_prompt(CONVERSATION, "chatml", qwen_tokenizer)
    ids = out.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == encode(conversation, qwen_tokenizer, "chatml").input_ids


def test_jinja_template_run_saves_it_and_checkpoints_are_model_directories(jinja_run):
    from transformers import AutoTokenizer

    checkpoint = jinja_run / "checkpoints" / "step-000001"
    for folder in (jinja_run, checkpoint):
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.chat_template == JINJA, folder
        assert tok.apply_chat_template(CONVERSATION, tokenize=False,
                                       add_generation_prompt=True).endswith("Answer: ")


@pytest.mark.parametrize("where", ["run", "checkpoint"])
def test_generate_uses_the_runs_template_for_runs_and_checkpoints(jinja_run, where):
    from trainer_core.data.chat import resolve_template
    from trainer_core.generate.generate import generation_setup

    folder = jinja_run if where == "run" else jinja_run / "checkpoints" / "step-000001"
    setup = generation_setup(str(folder))
    assert setup.run_dir == jinja_run and setup.tokenizer_dir == folder
    tokenizer = load_tokenizer(str(setup.tokenizer_dir))
    template = resolve_template(setup.chat_template, tokenizer)
    assert template.source == JINJA
    assert setup.cfg.profile.name == "plain_sft"
    result = CliRunner().invoke(cli, ["generate", "--model", str(folder), "--prompt", "Hi",
                                      "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    # An explicit flag still wins.
    assert generation_setup(str(folder), chat_template="chatml").chat_template == "chatml"


def test_checkpoint_without_saved_tokenizer_falls_back_to_the_training_tokenizer(
        jinja_run, micro_model_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(jinja_run, run)
    for name in os.listdir(run / "checkpoints" / "step-000001"):
        if name in TOKENIZER_FILES:
            (run / "checkpoints" / "step-000001" / name).unlink()
    for name in TOKENIZER_FILES:  # an interrupted run: no final model, no tokenizer
        (run / name).unlink(missing_ok=True)
    from trainer_core.generate.generate import generation_setup

    setup = generation_setup(str(run / "checkpoints" / "step-000001"))
    assert setup.tokenizer_dir == micro_model_dir


def test_save_tokenizer_copies_files_as_loaded_and_sets_the_template(tmp_path):
    from transformers import AutoTokenizer

    from trainer_core.data.tokenizer import bundled_tokenizer_dir

    source = bundled_tokenizer_dir()  # keeps its template inside tokenizer_config.json
    tok = load_tokenizer(None)
    save_tokenizer(tok, tmp_path / "own")  # None: keep the tokenizer's own template
    for name in os.listdir(source):
        assert (tmp_path / "own" / name).read_bytes() == (source / name).read_bytes(), name
    assert not (tmp_path / "own" / "chat_template.jinja").exists()

    save_tokenizer(tok, tmp_path / "new", JINJA)
    config, base_config = _json(tmp_path / "new" / "tokenizer_config.json"), \
        _json(source / "tokenizer_config.json")
    assert config.pop("chat_template") == JINJA
    base_config.pop("chat_template")
    assert config == base_config
    assert AutoTokenizer.from_pretrained(tmp_path / "new").chat_template == JINJA


def test_generate_does_not_switch_the_shared_tokenizer_to_left_padding(qwen_tokenizer,
                                                                       tiny_qwen3):
    from trainer_core.generate.processors import generate, left_padded

    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\na longer question<|im_end|>\n<|im_start|>assistant\n"]
    generate(tiny_qwen3, qwen_tokenizer, prompts, max_new_tokens=2)
    assert qwen_tokenizer.backend_tokenizer.padding is None
    assert qwen_tokenizer.padding_side == "right"
    ids, mask = left_padded(qwen_tokenizer, prompts)
    short = qwen_tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    assert ids[0, -len(short):].tolist() == short and mask[0].sum() == len(short)
    assert ids[0, 0] == qwen_tokenizer.pad_token_id and mask[1].all()


def test_generate_batches_streams_and_reports_progress(micro_model_dir, small_jsonl,
                                                       monkeypatch):
    import trainer_core.generate.processors as processors
    from trainer_core.generate.generate import run_generate

    real, calls, progress = processors.generate, [], []

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(processors, "generate", counting)
    records = run_generate(str(micro_model_dir), None, None, str(small_jsonl), 5, 2, False, {},
                           batch_size=2, progress=lambda d, t: progress.append((d, t)))
    first = next(records)
    assert calls == [2] and first["reference"]  # the first batch is out before the next runs
    rest = list(records)
    assert calls == [2, 2, 1] and len(rest) == 4
    assert progress == [(0, 5), (2, 5), (4, 5), (5, 5)]
    bad = CliRunner().invoke(cli, ["generate", "--model", str(micro_model_dir), "--dataset",
                                   str(small_jsonl), "--batch-size", "0"])
    assert bad.exit_code == 2 and "--batch-size" in bad.output


def test_preview_color_survives_a_pipe(small_jsonl):
    args = ["preview", "--profile", "plain_sft", "--dataset", str(small_jsonl), "-n", "1"]
    colored = CliRunner().invoke(cli, [*args, "--color"])  # CliRunner's stdout is not a TTY
    assert colored.exit_code == 0, colored.output
    assert "\x1b[1;32m" in colored.output and "[[" not in colored.output
    plain = CliRunner().invoke(cli, args)
    assert "\x1b[" not in plain.output and "[[" in plain.output


def test_preview_length_fits_the_reference_answers(qwen_tokenizer, tiny_qwen3, monkeypatch):
    import trainer_core.generate.processors as processors
    from trainer_core.config import load_config
    from trainer_core.generate.previews import generation_limit, run_previews
    from trainer_core.plugins.registry import build_profile

    long_answer = "word " * 300
    n = len(qwen_tokenizer(long_answer, add_special_tokens=False)["input_ids"]) + 1
    assert generation_limit(None, [long_answer, "short"], qwen_tokenizer) == n + n // 4
    assert generation_limit(None, ["x"], qwen_tokenizer) == 2 + 16
    assert generation_limit(None, [long_answer], qwen_tokenizer, cap=100) == 100
    assert generation_limit(None, [None], qwen_tokenizer) == 128
    assert generation_limit(7, [long_answer], qwen_tokenizer) == 7

    seen = []
    monkeypatch.setattr(processors, "generate",
                        lambda m, t, texts, procs, limit, **kw: seen.append(limit) or [""] * len(texts))
    prompts = [{"messages": [{"role": "user", "content": "Say words."}],
                "reference": long_answer, "example": {"messages": []}}]
    cfg = load_config()
    run_previews(tiny_qwen3, qwen_tokenizer, build_profile(cfg), prompts, cfg, 1)
    assert seen == [n + n // 4] and seen[0] > 128  # the old fixed limit would cut it
    cfg = load_config(overrides={"monitoring.max_new_tokens": 9})
    run_previews(tiny_qwen3, qwen_tokenizer, build_profile(cfg), prompts, cfg, 1)
    assert seen[-1] == 9


def test_dry_run_memory_estimate_counts_activations_and_logits(micro_model_dir, small_jsonl,
                                                               tmp_path):
    from trainer_core.config import resolve
    from trainer_core.train.recipe import run_training

    def estimate(**extra):
        cli = {"model.path": str(micro_model_dir), "data.dataset": str(small_jsonl),
               "output.output_dir": str(tmp_path / "o"), **extra}
        summary = run_training(resolve(cli=cli), dry_run=True, stream=open(os.devnull, "w"))
        return summary["estimated_memory_gb"], summary["parameters"]

    small, params = estimate(**{"hyperparams.batch_size": 1})
    large, _ = estimate(**{"hyperparams.batch_size": 32})
    # the runtime and four fp32 copies of the weights at least; the logits of a 152k
    # vocabulary grow with the trained tokens of a micro-batch (bench/memory.py measures it)
    assert small > 0.5 + 16 * params / 2**30
    assert large > small + 0.5


def test_checkpointed_layers_recompute_only_the_first_layers_and_keep_the_gradients():
    """``hyperparams.checkpointed_layers``: the first N decoder layers run their forward again
    in the backward pass, the rest keep their activations; the gradients are the same."""
    import copy

    import torch
    import transformers

    from trainer_core.model.loading import enable_checkpointing

    config = transformers.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    plain = transformers.Qwen3ForCausalLM(config).train()
    ids = torch.randint(0, 128, (2, 12))

    def grads_and_calls(model, layers):
        calls = [0] * len(model.model.layers)
        for i, layer in enumerate(model.model.layers):
            # A pre-hook: the recompute stops early, once the tensors it needs exist.
            layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        if layers != "off":
            assert enable_checkpointing(model, layers) == (3 if layers is None
                                                           else min(layers, 3), 3)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, calls

    expected, calls = grads_and_calls(copy.deepcopy(plain), "off")
    assert calls == [1, 1, 1]
    for layers, recomputes in ((None, [2, 2, 2]), (1, [2, 1, 1]), (2, [2, 2, 1]),
                               (0, [1, 1, 1]), (7, [2, 2, 2])):
        grads, calls = grads_and_calls(copy.deepcopy(plain), layers)
        assert calls == recomputes, layers
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6)


def test_memory_estimate_counts_the_checkpointed_layers(tmp_path):
    """--dry-run's estimate: each layer that recomputes keeps one hidden-size vector a token
    instead of its activations (an 8B shape at 2,048-token micro-batches)."""
    import json

    from trainer_core.config import load_config
    from trainer_core.train.manifest import _memory_estimate_gb

    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_hidden_layers": 36, "intermediate_size": 12288,
        "vocab_size": 151936}))
    stats = {"rows_kept": 100, "total_tokens": 204_800, "trained_tokens": 100_000}

    def estimate(**overrides):
        cfg = load_config(overrides={"hyperparams.batch_size": 1, "hyperparams.precision": "bf16",
                                     "data.max_tokens_per_batch": 2048, **overrides})
        return _memory_estimate_gb(8_000_000_000, cfg.hyperparams, cfg, tmp_path, stats)

    off = estimate()
    every = estimate(**{"hyperparams.gradient_checkpointing": True})
    half = estimate(**{"hyperparams.gradient_checkpointing": True,
                       "hyperparams.checkpointed_layers": 18})
    none = estimate(**{"hyperparams.gradient_checkpointing": True,
                       "hyperparams.checkpointed_layers": 0})
    layer = 2048 * (10 * 4096 + 4 * 12288) * 2 / 2**30  # one layer's activations, GiB
    assert every < half < none == off
    assert abs((half - every) - 18 * (layer - 2048 * 4096 * 2 / 2**30)) < 0.02


def test_training_with_the_tokenizers_own_template_keeps_its_files_unchanged(tmp_path):
    from types import SimpleNamespace

    from trainer_core.config import load_config
    from trainer_core.data.tokenizer import bundled_tokenizer_dir
    from trainer_core.train.recipe import save_run_tokenizer

    source = bundled_tokenizer_dir()  # its template lives in tokenizer_config.json
    for template, changed in (("tokenizer", set()), ("chatml", {"tokenizer_config.json",
                                                                "chat_template.jinja"})):
        run = SimpleNamespace(cfg=load_config(overrides={"model.chat_template": template}),
                              tokenizer=load_tokenizer(None))
        save_run_tokenizer(run, tmp_path / template)
        names = set(os.listdir(tmp_path / template))
        differ = {n for n in names if not (source / n).is_file()
                  or (source / n).read_bytes() != (tmp_path / template / n).read_bytes()}
        assert differ == changed, template
