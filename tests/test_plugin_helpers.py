"""The helpers a command plugin uses (load_config, parse_set, prepare_rows, profile_rng), what
`dir(trainer_core)` offers, and docs/plugins.md documenting every public name."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

import trainer_core
from trainer_core import Profile, UserError, hookimpl, load_config, prepare_rows, profile_rng
from trainer_core.testing import run_trainer

ROOT = Path(__file__).resolve().parents[1]


class Salted(Profile, name="salted", version="1"):
    """Appends ``index:draw`` (one draw of the row's rng) to every answer; rejects rows whose
    question contains REJECT (after the transform, so it sees transformed rows)."""

    def transform(self, example, index, rng):
        messages = [dict(m) for m in example["messages"]]
        messages[-1]["content"] += f" <{index}:{rng.random():.12f}>"
        return {**example, "messages": messages}

    def validate(self, example):
        question = example["messages"][-2]["content"]
        return ["messages[-2].content: says REJECT"] if "REJECT" in question else []


class Plugin:
    @hookimpl
    def register_profiles(self, register):
        register(Salted)


def _write(path: Path, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": f"answer to {q}"}]})
        + "\n" for q in questions), encoding="utf-8")
    return path


def test_dir_lists_the_lazy_public_names():
    listed = dir(trainer_core)
    assert set(trainer_core.__all__) <= set(listed)
    for name in ("load_config", "load_rows", "build_profile", "sample_dataset_path",
                 "prepare_rows", "profile_rng", "parse_set"):
        assert name in listed


def test_load_config_parses_sets_like_the_cli_and_checks_profile_options(trainer_plugin):
    cfg = load_config(sets=["hyperparams.max_steps=20", "data.dataset=x.jsonl"])
    assert cfg.hyperparams.max_steps == 20 and cfg.data.dataset == "x.jsonl"
    assert trainer_core.parse_set("monitoring.alerts=false") == ("monitoring.alerts", False)
    # typed overrides stay typed: a string for an integer is refused, naming the field
    with pytest.raises(UserError, match="hyperparams.max_steps"):
        load_config(overrides={"hyperparams.max_steps": "20"})
    # a program's config is what it says: no demo preset
    assert cfg.hyperparams.learning_rate == trainer_core.TrainerConfig().hyperparams.learning_rate
    # profile.options are checked here too, not only by build_profile
    trainer_plugin(Plugin(), "salted-plugin")
    with pytest.raises(UserError, match=r"profile\.options\.colour: unknown key"):
        load_config(overrides={"profile.name": "salted"}, sets=["profile.options.colour=1"])
    with pytest.raises(UserError, match="nope"):
        load_config(overrides={"profile.name": "nope"})


def test_prepare_rows_yields_what_training_trains_on(trainer_plugin, qwen_tokenizer, tmp_path,
                                                     monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    trainer_plugin(Plugin(), "salted-plugin")
    questions = [f"q{i}" + (" REJECT" if i in (3, 11) else "") for i in range(16)]
    data = _write(tmp_path / "train.jsonl", questions)
    cfg = load_config(overrides={"profile.name": "salted", "data.dataset": str(data),
                                 "data.validation_split": 0.25, "data.on_invalid": "skip"})
    prepared = list(prepare_rows(cfg))
    train = [p for p in prepared if p.split == "train"]
    val = [p for p in prepared if p.split == "validation"]
    assert len(train) == 12 and len(val) == 4
    assert [p.index for p in train] == list(range(12)) and [p.index for p in val] == [0, 1, 2, 3]
    # the rng is profile_rng(data.seed, index) for training rows, data.seed + 1 for validation
    for rows, seed in ((train, cfg.data.seed), (val, cfg.data.seed + 1)):
        for p in rows:
            assert p.example["messages"][-1]["content"].endswith(
                f"<{p.index}:{profile_rng(seed, p.index).random():.12f}>")
    rejected = sorted(p.line for p in prepared if p.problems)
    assert rejected == [4, 12]
    assert all(p.problems == ["messages[-2].content: says REJECT"]
               for p in prepared if p.problems)

    # Training trains on exactly these answers, and drops exactly the rejected rows.
    from trainer_core.plugins.registry import build_profile
    from trainer_core.train.inputs import load_rows, prepare_examples

    train_rows, val_rows, skipped = load_rows(cfg)
    assert skipped == {}  # load_rows does not apply the profile
    train_ex, val_ex, stats = prepare_examples(cfg, build_profile(cfg), qwen_tokenizer,
                                               train_rows, val_rows, skipped)
    for examples, rows, st in ((train_ex, train, stats["train"]),
                               (val_ex, val, stats["validation"])):
        decoded = [qwen_tokenizer.decode(examples[i]["input_ids"]) for i in range(len(examples))]
        kept = [p for p in rows if not p.problems]
        assert len(decoded) == len(kept)
        for text, p in zip(decoded, kept, strict=True):
            assert p.example["messages"][-1]["content"] in text
        assert st["dropped"].get("profile_invalid", 0) == len(rows) - len(kept)


def test_profile_rejections_of_both_files_in_error_and_dry_run(trainer_plugin, micro_model_dir,
                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    trainer_plugin(Plugin(), "salted-plugin")
    train = _write(tmp_path / "train.jsonl", [f"t{i}" + (" REJECT" if i < 3 else "")
                                              for i in range(12)])
    val = _write(tmp_path / "val.jsonl", [f"v{i}" + (" REJECT" if i == 1 else "")
                                          for i in range(4)])
    base = ["run", "--model", str(micro_model_dir), "--dataset", str(train), "--validation",
            str(val), "--output-dir", str(tmp_path / "out"), "--profile", "salted", "--dry-run",
            "--batch-size", "2"]
    failed = run_trainer(*base)
    assert failed.exit_code == 2
    assert f"{train}: 3 rows rejected by profile 'salted'" in failed.stderr
    assert f"{val}: 1 row rejected by profile 'salted'" in failed.stderr
    assert f"{val}:2: messages[-2].content: says REJECT" in failed.stderr
    skipped = run_trainer(*base, "--set", "data.on_invalid=skip")
    assert skipped.exit_code == 0, skipped.output
    assert "examples     9 kept, dropped: profile_invalid 3" in skipped.stderr
    assert "validation   3 kept, dropped: profile_invalid 1" in skipped.stderr
    assert f"dropped row  {val}:2: messages[-2].content: says REJECT" in skipped.stderr


def test_dry_run_prints_the_plan_and_the_config_only_on_request(micro_model_dir, small_jsonl,
                                                                tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))
    base = ["run", "--model", str(micro_model_dir), "--dataset", str(small_jsonl),
            "--output-dir", str(tmp_path / "out"), "--dry-run"]
    plain = run_trainer(*base)
    assert plain.exit_code == 0, plain.output
    assert plain.stdout == ""  # everything a run prints goes to stderr
    lines = plain.stderr.splitlines()
    assert lines[0] == "run plan" and len(lines) <= 12, plain.stderr
    assert '"hyperparams"' not in plain.stderr
    verbose = run_trainer(*base, "--verbose")
    config = verbose.stderr.split("\nconfig\n", 1)[1]
    assert json.loads(config)["hyperparams"]["batch_size"] == 8
    as_json = json.loads(run_trainer(*base, "--json").stdout)
    assert as_json["state"] == "planned" and as_json["config"]["data"]["dataset"] == str(
        small_jsonl)


def test_new_profile_next_line_calls_this_environments_tools(tmp_path):
    import sys

    from trainer_core.monitor.console import venv_tool

    result = run_trainer("new-profile", "nx", "--dir", str(tmp_path))
    nxt = next(line for line in result.stdout.splitlines() if line.startswith("next: "))
    pip, trainer = venv_tool("pip"), venv_tool("trainer")
    assert nxt.startswith(f"next: {pip} install -e {tmp_path / 'trainer-nx'} && {trainer} "
                          "profiles && ")
    # with this environment's scripts present, the line names them by path: it works in a
    # fresh shell with no activated venv
    if (Path(sys.executable).parent / "pip").exists():
        assert "/" in pip


# --------------------------------------------------------------------------- the docs


def _public() -> dict[str, object]:
    import trainer_core.generation
    import trainer_core.testing

    names = {n: getattr(trainer_core, n) for n in trainer_core.__all__}
    for module in (trainer_core.generation, trainer_core.testing):
        public = getattr(module, "__all__", None) or [
            n for n, v in vars(module).items() if not n.startswith("_")
            and getattr(v, "__module__", module.__name__).startswith("trainer_core")]
        names.update({n: getattr(module, n) for n in public})
    return names


def _params(obj: object) -> list[str] | None:
    """Parameter names of a callable (a class: its constructor), without self/cls; None for a
    non-callable or one whose signature cannot be read."""
    if not callable(obj):
        return None
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [p for p in sig.parameters if p not in ("self", "cls")]


def test_every_public_name_is_documented_with_its_signature():
    docs = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8").splitlines()
    missing = []
    for name, obj in sorted(_public().items()):
        params = _params(obj)
        if params is None:
            if not any(f"`{name}`" in line for line in docs):
                missing.append(name)
            continue
        if not any(f"`{name}(" in line and all(re.search(rf"\b{re.escape(p)}\b",
                                                         line.split(f"`{name}(", 1)[1])
                                                for p in params) for line in docs):
            missing.append(f"{name}({', '.join(params)})")
    assert not missing, "not documented in docs/plugins.md with their parameters: " + \
        ", ".join(missing)
