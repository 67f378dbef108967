"""``trainer config migrate``: the old flat format into the current one, nothing dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from trainer_core.cli import cli
from trainer_core.config import flatten, from_dict, resolve, to_dict
from trainer_core.config.migrate import migrate
from trainer_core.errors import ConfigError

OLD = Path(__file__).parent / "data" / "old-config.json"

#: Old key (nested ones as ``section.key``) -> new dotted path and the value expected there.
MAPPED: dict[str, tuple[str, Any]] = {
    "model_path": ("model.path", "/srv/models/SmolChat-360M"),
    "tokenizer_path": ("model.tokenizer", "/srv/models/SmolChat-360M-tok"),
    "base_model": ("locked.base_model", "acme/SmolChat-360M"),
    "batch_size": ("hyperparams.batch_size", 4),
    "gradient_accumulation": ("hyperparams.gradient_accumulation", 8),
    # The flat 0.0002 conflicts with hyperparams.learning_rate; the nested section wins.
    "learning_rate": ("hyperparams.learning_rate", 0.0003),
    "warmup_steps": ("hyperparams.warmup_steps", 50),
    "max_length": ("hyperparams.max_length", 1024),
    "eval_steps": ("hyperparams.eval_steps", 250),
    "save_steps": ("hyperparams.save_steps", 750),
    "num_eval_samples": ("monitoring.num_preview_samples", 3),
    "eval_max_tokens": ("monitoring.max_new_tokens", 512),
    # fp16=true conflicts with hyperparams.fp_precision=bf16; the nested section wins.
    "fp16": ("hyperparams.precision", "bf16"),
    "bf16": ("hyperparams.precision", "bf16"),
    "current_model_dir": ("output.output_dir", "work/current"),
    "hyperparams.fp_precision": ("hyperparams.precision", "bf16"),
    "hyperparams.learning_rate": ("hyperparams.learning_rate", 0.0003),
    "hyperparams.batch_size": ("hyperparams.batch_size", 4),
    "hyperparams.use_gradient_checkpointing": ("hyperparams.gradient_checkpointing", True),
    "profile.name": ("profile.name", "plain_sft"),
    "profile.options": ("profile.options",
                        {"system_prompt": "You are a concise assistant. Today is {date}."}),
    "locked.base_model": ("locked.base_model", "acme/SmolChat-360M"),
    "locked.model_architecture": ("locked.model_architecture", "LlamaForCausalLM"),
    "locked.max_context_length": ("locked.max_context_length", 2048),
    "locked.vocab_size": ("locked.vocab_size", 49152),
    # The old daemon's service keys have a home in the daemon section.
    "poll_interval": ("daemon.poll_interval_s", 60.0),
    "snapshot_time": ("daemon.snapshot_time", "04:30"),
    "retention.max_age_hours": ("daemon.snapshot_max_age_h", 48.0),
    "retention.max_total_gb": ("daemon.max_total_gb", 80.0),
}

UNMAPPED = {
    "model_name": "smolchat_360m",
    "notify_email": "ops@example.invalid",
    "hyperparams.optimizer": "adamw_torch",
    "profile.temperature": 0.7,
    "locked.tokenizer_hash": "ab12cd34",
}


def old_keys(old: dict[str, Any]) -> set[str]:
    """Every key of an old file; the partly nested sections count key by key."""
    out = set()
    for key, value in old.items():
        if key in ("hyperparams", "locked", "profile", "retention") and isinstance(value, dict):
            out.update(f"{key}.{k}" for k in value)
        else:
            out.add(key)
    return out


@pytest.fixture
def old() -> dict[str, Any]:
    return json.loads(OLD.read_text(encoding="utf-8"))


def test_sample_is_fully_accounted_for_by_this_test(old):
    assert old_keys(old) == set(MAPPED) | set(UNMAPPED)


def test_migrated_values(old):
    result = migrate(old)
    flat = flatten(result.config)
    for old_key, (dotted, value) in MAPPED.items():
        section, name = dotted.split(".")
        assert result.config[section][name] == value, (old_key, dotted)
    assert result.config["config_version"] == 1
    # Fields the old file did not mention keep their defaults.
    defaults = flatten(to_dict(from_dict({})))
    touched = {dotted for dotted, _ in MAPPED.values()}
    for dotted, value in flat.items():
        if dotted not in touched and not dotted.startswith("profile.options"):
            assert value == defaults[dotted], dotted


def test_every_old_key_is_mapped_or_unmapped(old):
    result = migrate(old)
    assert result.unmapped == UNMAPPED
    # Nothing that was mapped is reported as unmapped too.
    assert not set(result.unmapped) & set(MAPPED)


def test_unknown_keys_anywhere_are_kept_as_unmapped():
    old = {
        "learning_rate": 1e-4,
        "daemon_port": 8080,
        "hyperparams": {"lr": 1, "batch_size": 2},
        "locked": {"sha": "x"},
        "profile": {"name": "plain_sft", "seed": 3},
        "auto_generate": {"enabled": False, "count": 10},
    }
    result = migrate(old)
    assert result.unmapped == {
        "daemon_port": 8080,
        "hyperparams.lr": 1,
        "locked.sha": "x",
        "profile.seed": 3,
        "auto_generate": {"enabled": False, "count": 10},
    }
    assert result.config["hyperparams"]["batch_size"] == 2
    assert result.config["hyperparams"]["learning_rate"] == 1e-4


def test_conflicts_produce_notes(old):
    notes = migrate(old).notes
    lr = [n for n in notes if "hyperparams.learning_rate" in n and "0.0002" in n]
    assert len(lr) == 1 and "0.0003" in lr[0], notes
    precision = [n for n in notes if "hyperparams.precision" in n]
    assert len(precision) == 1 and "bf16" in precision[0] and "fp16" in precision[0], notes
    # Agreeing values (batch_size, base_model) produce no note.
    assert not [n for n in notes if "batch_size" in n or "base_model" in n], notes


@pytest.mark.parametrize("nested_first", [True, False])
def test_nested_section_wins_whatever_the_key_order(nested_first):
    flat_part = {"learning_rate": 0.1, "max_length": 100}
    nested_part = {"hyperparams": {"learning_rate": 0.2, "max_length": 200}}
    old = {**nested_part, **flat_part} if nested_first else {**flat_part, **nested_part}
    result = migrate(old)
    assert result.config["hyperparams"]["learning_rate"] == 0.2
    assert result.config["hyperparams"]["max_length"] == 200
    assert len(result.notes) == 2
    assert all("hyperparams." in n for n in result.notes)


def test_both_precision_flags_note():
    result = migrate({"bf16": True, "fp16": True})
    assert result.config["hyperparams"]["precision"] == "bf16"
    assert any("bf16" in n and "fp16" in n for n in result.notes)
    assert migrate({"fp16": True}).config["hyperparams"]["precision"] == "fp16"


def test_old_daemon_keys_go_to_the_daemon_section():
    result = migrate({"poll_interval": 5, "snapshot_time": "23:15",
                      "retention": {"max_age_hours": 12, "max_total_gb": 1.5, "keep": 4}})
    daemon = result.config["daemon"]
    assert daemon["poll_interval_s"] == 5.0
    assert daemon["snapshot_time"] == "23:15"
    assert daemon["snapshot_max_age_h"] == 12.0
    assert daemon["max_total_gb"] == 1.5
    # Retention keys without a counterpart are listed, not dropped.
    assert result.unmapped == {"retention.keep": 4}


def test_old_daemon_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="daemon.snapshot_time: must be HH:MM"):
        migrate({"snapshot_time": "4.30am"})
    with pytest.raises(ConfigError, match="daemon.poll_interval_s: must be > 0"):
        migrate({"poll_interval": 0})


def test_profile_as_plain_string():
    result = migrate({"profile": "emoji_think"})
    assert result.config["profile"]["name"] == "emoji_think"
    assert result.unmapped == {}


def test_invalid_old_value_is_a_config_error():
    with pytest.raises(ConfigError, match="hyperparams.batch_size: must be > 0"):
        migrate({"batch_size": 0})


def test_migrated_config_validates(old, tmp_path):
    result = migrate(old)
    assert from_dict(result.config) is not None
    path = tmp_path / "new.json"
    path.write_text(json.dumps(result.config), encoding="utf-8")
    assert to_dict(resolve(file=path).config) == result.config


# --------------------------------------------------------------------------- the CLI


def test_cli_migrate_writes_new_and_unmapped(tmp_path):
    new = tmp_path / "new.json"
    result = CliRunner().invoke(cli, ["config", "migrate", str(OLD), str(new)])
    assert result.exit_code == 0, result.output
    assert json.loads(new.read_text(encoding="utf-8")) == migrate(
        json.loads(OLD.read_text(encoding="utf-8"))).config
    side = tmp_path / "new.unmapped.json"
    assert json.loads(side.read_text(encoding="utf-8")) == UNMAPPED
    assert f"wrote {new}" in result.stdout
    # Every unmapped key is listed on stderr, and the notes are there too.
    for key in UNMAPPED:
        assert f"  {key} = " in result.stderr, key
    assert f"{len(UNMAPPED)} key(s) have no place" in result.stderr
    assert "note: " in result.stderr

    validate = CliRunner().invoke(cli, ["config", "validate", str(new)])
    assert validate.exit_code == 0, validate.output
    assert validate.stdout.strip() == f"{new}: ok"


def test_cli_migrate_refuses_to_overwrite(tmp_path):
    new = tmp_path / "new.json"
    new.write_text("precious\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["config", "migrate", str(OLD), str(new)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert new.read_text(encoding="utf-8") == "precious\n"
    assert not (tmp_path / "new.unmapped.json").exists()

    forced = CliRunner().invoke(cli, ["config", "migrate", "--force", str(OLD), str(new)])
    assert forced.exit_code == 0, forced.output
    assert json.loads(new.read_text(encoding="utf-8"))["config_version"] == 1


def test_cli_migrate_nothing_unmapped_writes_no_side_file(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"learning_rate": 1e-4, "batch_size": 2}), encoding="utf-8")
    new = tmp_path / "new.json"
    result = CliRunner().invoke(cli, ["config", "migrate", str(old), str(new)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "new.unmapped.json").exists()
    assert "no place" not in result.stderr


def test_cli_migrate_bad_old_file(tmp_path):
    old = tmp_path / "old.json"
    old.write_text('{"learning_rate": }', encoding="utf-8")
    result = CliRunner().invoke(cli, ["config", "migrate", str(old), str(tmp_path / "n.json")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {old}:1:")
    assert not (tmp_path / "n.json").exists()


# --------------------------------------------------------------------------- other frameworks

AXOLOTL = Path(__file__).parent / "data" / "axolotl-sft.yaml"

#: Axolotl key -> (dotted path, value) in the migrated config.
AXOLOTL_MAPPED: dict[str, tuple[str, Any]] = {
    "base_model": ("model.path", "Qwen/Qwen3-0.6B"),
    "trust_remote_code": ("model.trust_remote_code", False),
    "chat_template": ("model.chat_template", "chatml"),
    "val_set_size": ("data.validation_split", 0.05),
    "output_dir": ("output.output_dir", "./outputs/qwen3-sft"),
    "sequence_len": ("hyperparams.max_length", 2048),
    "sample_packing": ("data.packing", True),
    "gradient_accumulation_steps": ("hyperparams.gradient_accumulation", 4),
    "micro_batch_size": ("hyperparams.batch_size", 2),
    "num_epochs": ("hyperparams.num_epochs", 3.0),
    "lr_scheduler": ("hyperparams.lr_scheduler", "cosine"),
    "learning_rate": ("hyperparams.learning_rate", 0.0002),
    "warmup_steps": ("hyperparams.warmup_steps", 10),
    "weight_decay": ("hyperparams.weight_decay", 0.01),
    "max_grad_norm": ("hyperparams.max_grad_norm", 1.0),
    "bf16": ("hyperparams.precision", "bf16"),
    "gradient_checkpointing": ("hyperparams.gradient_checkpointing", True),
    "logging_steps": ("environment.logging_steps", 5),
    "eval_steps": ("hyperparams.eval_steps", 100),
    "save_steps": ("hyperparams.save_steps", 200),
    "save_total_limit": ("hyperparams.save_total_limit", 2),
    "seed": ("hyperparams.seed", 7),
    # The first dataset: its file, format, columns and roles.
    "datasets[0].path": ("data.dataset", "data/chats.jsonl"),
    "datasets[0].type": ("data.format", "sharegpt"),
    "datasets[0].roles": ("data.roles", {"human": "user", "gpt": "assistant",
                                         "bot": "assistant"}),
}
AXOLOTL_UNMAPPED = {"dataset_prepared_path": "last_run_prepared", "pad_to_sequence_len": True,
                    "adapter": "lora", "lora_r": 16, "lora_alpha": 32,
                    "wandb_project": "qwen3-sft", "optimizer": "adamw_torch_fused",
                    "tf32": True}


def test_axolotl_yaml_migrates(tmp_path):
    from trainer_core.config import read_config_file
    from trainer_core.config.migrate import migrate_axolotl

    old = read_config_file(AXOLOTL)
    result = migrate_axolotl(old, AXOLOTL)
    flat = flatten(result.config)
    mapped = {k: v for k, v in AXOLOTL_MAPPED.items() if not k.startswith("datasets")}
    assert len(mapped) >= 15
    for key, (dotted, value) in AXOLOTL_MAPPED.items():
        assert flat[dotted] == value, (key, dotted, flat[dotted])
    assert result.unmapped == AXOLOTL_UNMAPPED
    # Every key of the file is mapped, listed, or says what trainer does anyway.
    assert set(old) == ({k.split("[")[0] for k in AXOLOTL_MAPPED} | set(AXOLOTL_UNMAPPED)
                        | {"train_on_inputs"})
    # The hub name stays (the user edits it) with a note on pointing at a local copy.
    assert any("Qwen/Qwen3-0.6B" in n and "local-dir models/Qwen3-0.6B" in n
               for n in result.notes), result.notes


def test_cli_migrate_from_axolotl_writes_yaml(tmp_path):
    new = tmp_path / "run.yaml"
    result = CliRunner().invoke(cli, ["config", "migrate", "--from", "axolotl", str(AXOLOTL),
                                      str(new)])
    assert result.exit_code == 0, result.output
    assert f"{len(AXOLOTL_UNMAPPED)} key(s) have no place" in result.stderr
    assert "  lora_r = 16" in result.stderr
    assert json.loads((tmp_path / "run.unmapped.json").read_text()) == AXOLOTL_UNMAPPED
    resolved = resolve(file=new)  # the YAML written loads with the same values
    assert resolved.config.hyperparams.learning_rate == 0.0002
    assert resolved.config.data.format == "sharegpt"
    assert resolved.sources["hyperparams.batch_size"] == "file"


def test_axolotl_values_trainer_has_not_are_listed_with_a_note():
    from trainer_core.config.migrate import migrate_axolotl

    result = migrate_axolotl({"lr_scheduler": "cosine_with_restarts", "val_set_size": 200,
                              "chat_template": "llama3", "datasets": [
                                  {"path": "a.jsonl", "type": "alpaca"},
                                  {"path": "b.jsonl", "type": "alpaca"}]})
    assert result.unmapped == {"lr_scheduler": "cosine_with_restarts", "val_set_size": 200,
                               "chat_template": "llama3",
                               "datasets[1:]": [{"path": "b.jsonl", "type": "alpaca"}]}
    assert result.config["data"]["dataset"] == "a.jsonl"
    assert result.config["data"]["format"] == "alpaca"
    assert any("hyperparams.lr_scheduler: must be one of" in n for n in result.notes)


def test_llamafactory_yaml_with_dataset_info(tmp_path):
    from trainer_core.config.migrate import migrate_llamafactory

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"my_chats": {
        "file_name": "chats.json", "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant"}}}))
    yaml_file = tmp_path / "qwen3_full_sft.yaml"
    yaml_file.write_text(
        "model_name_or_path: /srv/models/Qwen3-0.6B\nstage: sft\ndo_train: true\n"
        "finetuning_type: full\ndataset: my_chats\ntemplate: qwen3\ncutoff_len: 1024\n"
        "output_dir: saves/qwen3\nlogging_steps: 10\nsave_steps: 500\n"
        "per_device_train_batch_size: 1\ngradient_accumulation_steps: 8\nlearning_rate: 1.0e-5\n"
        "num_train_epochs: 3.0\nlr_scheduler_type: cosine\nwarmup_ratio: 0.1\nbf16: true\n"
        "val_size: 0.1\neval_steps: 500\nreport_to: none\n", encoding="utf-8")
    from trainer_core.config import read_config_file

    result = migrate_llamafactory(read_config_file(yaml_file), yaml_file)
    flat = flatten(result.config)
    assert flat["model.path"] == "/srv/models/Qwen3-0.6B"
    assert flat["data.dataset"] == str(tmp_path / "data" / "chats.json")
    assert flat["data.format"] == "sharegpt"
    assert flat["data.columns"] == {"messages": "messages", "role": "role",
                                    "content": "content"}
    assert flat["data.roles"] == {"user": "user", "assistant": "assistant"}
    assert flat["hyperparams.max_length"] == 1024
    assert flat["hyperparams.batch_size"] == 1
    assert flat["hyperparams.gradient_accumulation"] == 8
    assert flat["hyperparams.learning_rate"] == 1e-5
    assert flat["hyperparams.warmup_ratio"] == 0.1
    assert flat["hyperparams.precision"] == "bf16"
    assert flat["data.validation_split"] == 0.1
    assert result.unmapped == {"template": "qwen3", "report_to": "none"}
