"""The typed config: precedence and provenance, round trip, and every kind of validation error."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import attrs
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trainer_core
from trainer_core.cli import cli
from trainer_core.config import (
    TrainerConfig,
    from_dict,
    load_config,
    resolve,
    to_dict,
)
from trainer_core.config import sections as C
from trainer_core.config import sources as R
from trainer_core.demo import DEMO_HYPERPARAMS as DEMO_PRESET
from trainer_core.errors import ConfigError

# --------------------------------------------------------------------------- helpers


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def show_explain(args: list[str]) -> dict[str, tuple[Any, str]]:
    """Run ``trainer config show --explain`` and parse it into ``{dotted: (value, source)}``."""
    result = CliRunner().invoke(cli, ["config", "show", "--explain", *args])
    assert result.exit_code == 0, result.output
    out = {}
    for line in result.stdout.splitlines():
        key, rest = line.split(None, 1)
        value, source = rest.rsplit(None, 1)
        out[key] = (json.loads(value), source)
    return out


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    return str(info.value)


# --------------------------------------------------------------------------- precedence matrix

#: (dotted path, value in the file, CLI arguments, value they give). The file and CLI values
#: differ from each other and (except where noted) from the default.
FIELDS = [
    ("hyperparams.batch_size", 4, ["--batch-size", "6"], 6),
    ("hyperparams.learning_rate", 1e-3, ["--learning-rate", "5e-4"], 5e-4),
    # --seed 42 is the default value: passing it explicitly still wins over the file.
    ("hyperparams.seed", 7, ["--seed", "42"], 42),
    ("hyperparams.precision", "bf16", ["--fp32"], "fp32"),
    # --packing gives the default value back; the file's False must survive when it is absent.
    ("data.packing", False, ["--packing"], True),
    ("data.validation_split", 0.1, ["--set", "data.validation_split=0.2"], 0.2),
    ("hyperparams.lr_scheduler", "linear", ["--set", "hyperparams.lr_scheduler=constant"],
     "constant"),
    ("output.output_dir", "from-file", ["--output-dir", "from-cli"], "from-cli"),
]
DEFAULTS = R.flatten(to_dict(TrainerConfig()))
#: A model path in every file below keeps the demo preset out of the matrix.
MODEL = {"model": {"path": "some/model"}}


def file_for(dotted: str, value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = json.loads(json.dumps(MODEL))
    R.set_dotted(tree, dotted, value)
    return tree


@pytest.mark.parametrize("dotted,file_value,cli_args,cli_value", FIELDS,
                         ids=[f[0] for f in FIELDS])
@pytest.mark.parametrize("layers", ["default", "file", "cli", "file+cli"])
def test_precedence_matrix_cli(tmp_path, dotted, file_value, cli_args, cli_value, layers):
    data = file_for(dotted, file_value) if "file" in layers else MODEL
    path = write_json(tmp_path / "c.json", data)
    args = ["--config", str(path)] + (cli_args if "cli" in layers else [])
    shown = show_explain(args)
    expected = {
        "default": (DEFAULTS[dotted], "default"),
        "file": (file_value, "file"),
        "cli": (cli_value, "cli"),
        "file+cli": (cli_value, "cli"),
    }[layers]
    assert shown[dotted] == expected
    # The model path always comes from the file; untouched fields stay default.
    assert shown["model.path"] == ("some/model", "file")
    assert shown["environment.device"] == ("auto", "default")


@pytest.mark.parametrize("dotted,file_value,cli_args,cli_value", FIELDS,
                         ids=[f[0] for f in FIELDS])
@pytest.mark.parametrize("layers", ["default", "file", "cli", "file+cli"])
def test_precedence_matrix_resolve(tmp_path, dotted, file_value, cli_args, cli_value, layers):
    data = file_for(dotted, file_value) if "file" in layers else MODEL
    path = write_json(tmp_path / "c.json", data)
    cli_overrides = {dotted: cli_value} if "cli" in layers else {}
    resolved = resolve(file=path, cli=cli_overrides)
    flat = R.flatten(to_dict(resolved.config))
    want_value, want_source = {
        "default": (DEFAULTS[dotted], "default"),
        "file": (file_value, "file"),
        "cli": (cli_value, "cli"),
        "file+cli": (cli_value, "cli"),
    }[layers]
    assert flat[dotted] == want_value
    assert resolved.sources[dotted] == want_source
    assert set(resolved.sources.values()) <= {"default", "file", "cli"}
    assert set(resolved.sources) >= set(DEFAULTS)


def test_flags_not_given_leave_the_file_alone(tmp_path):
    """Every typed flag defaults to None: a file setting all of them survives a bare CLI."""
    data = {
        "hyperparams": {"batch_size": 3, "gradient_accumulation": 5, "learning_rate": 0.01,
                        "num_epochs": 2.5, "max_steps": 11, "max_length": 99, "seed": 1,
                        "save_steps": 13, "eval_steps": 17, "precision": "fp16"},
        "data": {"dataset": "d.jsonl", "validation": "v.jsonl", "packing": False},
        "model": {"path": "m", "tokenizer": "t", "chat_template": "tokenizer"},
        "output": {"output_dir": "o", "resume": "ckpt"},
        "profile": {"name": "plain_sft"},
    }
    path = write_json(tmp_path / "c.json", data)
    shown = show_explain(["--config", str(path)])
    for dotted, value in R.flatten(data).items():
        assert shown[dotted] == (value, "file"), dotted


def test_preset_layer_between_default_and_file(tmp_path):
    """Without a model the demo preset applies: above defaults, below the file and the CLI."""
    path = write_json(tmp_path / "c.json", {"hyperparams": {"batch_size": 2}})
    shown = show_explain(["--config", str(path), "--max-length", "100"])
    assert shown["hyperparams.learning_rate"] == (DEMO_PRESET["hyperparams.learning_rate"],
                                                  "preset")
    assert shown["hyperparams.batch_size"] == (2, "file")  # the preset says 16
    assert shown["hyperparams.max_length"] == (100, "cli")  # the preset says 256
    assert shown["hyperparams.weight_decay"] == (0.0, "default")

    resolved = resolve(file=path, cli={"hyperparams.max_length": 100},
                       preset={"hyperparams.learning_rate": 3e-3, "hyperparams.batch_size": 16,
                               "hyperparams.max_length": 256})
    assert resolved.sources["hyperparams.learning_rate"] == "preset"
    assert resolved.sources["hyperparams.batch_size"] == "file"
    assert resolved.sources["hyperparams.max_length"] == "cli"
    assert resolved.config.hyperparams.batch_size == 2
    assert resolved.config.hyperparams.max_length == 100


def test_profile_options_merge_file_and_cli(tmp_path):
    path = write_json(tmp_path / "c.json",
                      {"profile": {"options": {"system_prompt": "hi", "system_prompt_mode": "keep"}}})
    resolved = resolve(file=path, cli={"profile.options.system_prompt_mode": "replace"})
    assert resolved.config.profile.options == {"system_prompt": "hi",
                                               "system_prompt_mode": "replace"}
    assert resolved.sources["profile.options.system_prompt"] == "file"
    assert resolved.sources["profile.options.system_prompt_mode"] == "cli"


# --------------------------------------------------------------------------- round trip

ENUM_CHOICES = sorted(set(C.PRECISIONS + C.SCHEDULERS + C.ON_INVALID + C.DTYPES + C.ATTN_IMPLS
                          + C.DEVICES + C.SWITCHES + C.SPECIAL_TOKEN_POLICIES
                          + C.PRIORITIES + C.DAEMON_LR_SCHEDULES + C.DISTRIBUTED + C.ROW_FORMATS + C.ADAPTERS
                          + ("00:00", "04:30", "23:59")  # daemon.snapshot_time
                          + ("local", "http://127.0.0.1:8765")))  # monitoring.preview_backend

json_leaf = (st.none() | st.booleans() | st.integers()
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)


def _valid(a: attrs.Attribute):
    def ok(value: Any) -> bool:
        if a.validator is None:
            return True
        try:
            a.validator(None, a, value)
        except ValueError:
            return False
        return True

    return ok


def strategy_for_type(tp: Any, a: attrs.Attribute) -> st.SearchStrategy:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [t for t in typing.get_args(tp) if t is not type(None)]
        assert len(args) == 1, tp
        return st.none() | strategy_for_type(args[0], a)
    if tp is bool:
        return st.booleans()
    ok = _valid(a)
    # Numeric ranges are read off the validator by probing its edges.
    if tp is int:
        lo = None if ok(-1) else (0 if ok(0) else 1)
        assert ok(10**9), a.name
        return (st.integers(lo if lo is not None else -5, 10_000)
                | st.integers(min_value=lo, max_value=2**53)).filter(ok)
    if tp is float:
        finite = {"allow_nan": False, "allow_infinity": False}
        if ok(2.0):
            lo = None if ok(-1.0) else 0.0
            return st.floats(min_value=lo, exclude_min=not ok(0.0) and lo is not None,
                             **finite).filter(ok)
        assert ok(0.5) and ok(0.0), a.name  # a fraction in [0, 1] or [0, 1)
        return st.floats(0.0, 1.0).filter(ok)
    if tp is str:
        if a.validator is not None:  # an enum
            choices = [c for c in ENUM_CHOICES if ok(c)]
            assert choices, f"enum {a.name}: add its choices to ENUM_CHOICES"
            return st.sampled_from(choices)
        return st.text(max_size=20)
    if origin is list and typing.get_args(tp) == (str,):
        if a.validator is not None:  # a list of choices (output.allow_changes)
            return st.lists(st.sampled_from(C.CHANGE_KINDS), max_size=3)
        return st.lists(st.text(max_size=8), max_size=3)
    if origin is dict and typing.get_args(tp) == (str, str):  # data.columns, data.roles
        keys = st.sampled_from(C.DATA_COLUMNS) if a.name == "columns" else st.text(max_size=10)
        values = st.sampled_from(C.DATA_ROLES) if a.name == "roles" else st.text(max_size=10)
        return st.dictionaries(keys, values, max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=10), json_value, max_size=4)
    raise AssertionError(f"no strategy for field {a.name}: {tp!r}; extend this test")


def section_strategy(cls: type) -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {a.name: strategy_for_type(a.type, a) for a in attrs.fields(cls)}
    ).map(lambda kw: cls(**kw))


SECTION_CLASSES = {a.name: a.type for a in attrs.fields(TrainerConfig) if attrs.has(a.type)}


@st.composite
def configs(draw) -> TrainerConfig:
    sections = {name: draw(section_strategy(cls)) for name, cls in SECTION_CLASSES.items()}
    hp, locked, data = sections["hyperparams"], sections["locked"], sections["data"]
    # The cross-field rules: max_length <= locked.max_context_length <= ... and the packed
    # micro-batch budget must fit the longest example.
    if locked.max_context_length is not None and locked.max_context_length < hp.max_length:
        sections["locked"] = attrs.evolve(
            locked, max_context_length=hp.max_length + draw(st.integers(0, 1000)))
    if data.max_tokens_per_batch is not None and data.max_tokens_per_batch < hp.max_length:
        sections["data"] = attrs.evolve(
            data, max_tokens_per_batch=hp.max_length + draw(st.integers(0, 1000)))
    return TrainerConfig(config_version=C.CONFIG_VERSION, **sections)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_round_trip_is_lossless(cfg):
    data = to_dict(cfg)
    assert from_dict(data) == cfg
    # ... and through JSON text, as a config file would carry it.
    assert from_dict(json.loads(json.dumps(data))) == cfg
    assert to_dict(from_dict(data)) == data


def test_round_trip_covers_every_field():
    """Every leaf in to_dict is a schema field (nothing lost or invented)."""
    flat = R.flatten(to_dict(TrainerConfig()))
    assert set(flat) == set(C.field_paths())
    assert from_dict({}) == TrainerConfig()
    assert from_dict(to_dict(TrainerConfig())) == TrainerConfig()


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_suggests():
    msg = config_error({"hyperparam": {"batch_size": 2}})
    assert msg == "hyperparam: unknown key (did you mean 'hyperparams'?)"


def test_unknown_key_inside_section_suggests():
    msg = config_error({"hyperparams": {"learning_rat": 1e-4}})
    assert msg == "hyperparams.learning_rat: unknown key (did you mean 'learning_rate'?)"


def test_unknown_key_without_close_match_lists_known():
    msg = config_error({"monitoring": {"zzzz": 1}})
    assert msg.startswith("monitoring.zzzz: unknown key (known keys: status_interval_s")


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write_json(tmp_path / "c.json", {"data": {"shufle": False}})
    with pytest.raises(ConfigError) as info:
        resolve(file=path)
    assert str(info.value) == f"{path}: data.shufle: unknown key (did you mean 'shuffle'?)"


def test_unknown_key_via_set():
    with pytest.raises(ConfigError, match=r"did you mean 'hyperparams.learning_rate'"):
        resolve(cli={"hyperparams.learning_rat": 1e-4})
    result = CliRunner().invoke(cli, ["config", "show", "--set", "hyperparams.learning_rat=1"])
    assert result.exit_code == 2
    assert result.stderr == ("error: hyperparams.learning_rat: unknown setting "
                             "(did you mean 'hyperparams.learning_rate'?)\n")


def test_set_profile_options_are_free_form():
    cfg = load_config(overrides={"profile.options.anything": [1, 2]})
    assert cfg.profile.options == {"anything": [1, 2]}


# --------------------------------------------------------------------------- validation errors


def test_error_range():
    assert config_error({"hyperparams": {"batch_size": 0}}) == (
        "hyperparams.batch_size: must be > 0, got 0")
    assert config_error({"data": {"validation_split": 1.5}}) == (
        "data.validation_split: must be >= 0 and < 1, got 1.5")
    assert config_error({"hyperparams": {"save_steps": -1}}) == (
        "hyperparams.save_steps: must be >= 0, got -1")


def test_error_enum():
    assert config_error({"hyperparams": {"lr_scheduler": "cos"}}) == (
        "hyperparams.lr_scheduler: must be one of cosine, linear, constant, got 'cos'")


def test_error_type():
    assert config_error({"hyperparams": {"batch_size": "8"}}) == (
        "hyperparams.batch_size: expected an integer, got '8'")
    assert config_error({"hyperparams": {"batch_size": 1.5}}) == (
        "hyperparams.batch_size: expected an integer, got 1.5")
    assert config_error({"hyperparams": {"learning_rate": "fast"}}) == (
        "hyperparams.learning_rate: expected a number, got 'fast'")
    assert config_error({"environment": {"report_to": "wandb"}}) == (
        "environment.report_to: expected a list, got 'wandb'")
    assert config_error({"profile": {"options": 5}}) == (
        "profile.options: expected an object, got 5")
    assert config_error({"hyperparams": 5}) == "hyperparams: expected an object, got 5"


def test_a_retired_field_in_an_old_file_is_ignored(tmp_path):
    # An old daemon home's config (or a run's trainer_config.json) names a field since removed.
    old = to_dict(TrainerConfig())
    old["environment"]["dataloader_workers"] = 2
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    resolved = R.resolve(file=path)
    assert resolved.config == TrainerConfig()
    assert "environment.dataloader_workers" not in resolved.sources
    assert from_dict(old) == TrainerConfig()
    assert old["environment"]["dataloader_workers"] == 2  # the caller's dict is untouched
    assert "dataloader_workers" not in to_dict(TrainerConfig())["environment"]
    # Still an unknown setting where the user types it now.
    with pytest.raises(ConfigError, match="environment.dataloader_workers: unknown setting"):
        R.set_dotted({}, "environment.dataloader_workers", 2)


def test_int_is_accepted_for_float():
    cfg = from_dict({"hyperparams": {"learning_rate": 1, "num_epochs": 2}})
    assert cfg.hyperparams.learning_rate == 1.0
    assert isinstance(cfg.hyperparams.num_epochs, float)


def test_error_bool_as_int():
    assert config_error({"hyperparams": {"batch_size": True}}) == (
        "hyperparams.batch_size: expected an integer, got True")
    assert config_error({"hyperparams": {"learning_rate": False}}) == (
        "hyperparams.learning_rate: expected a number, got False")
    # ... and the reverse: an int is not a bool.
    assert config_error({"data": {"shuffle": 1}}) == "data.shuffle: expected true or false, got 1"


def test_error_cross_field_max_length_vs_context():
    msg = config_error({"hyperparams": {"max_length": 5000},
                        "locked": {"max_context_length": 4096}})
    assert msg == ("hyperparams.max_length: must be <= locked.max_context_length (4096), "
                   "got 5000")
    assert from_dict({"hyperparams": {"max_length": 4096},
                      "locked": {"max_context_length": 4096}})


def test_error_cross_field_tokens_per_batch():
    msg = config_error({"hyperparams": {"max_length": 512}, "data": {"max_tokens_per_batch": 100}})
    assert msg == ("data.max_tokens_per_batch: must be >= hyperparams.max_length (512) so the "
                   "longest example fits, got 100")
    assert from_dict({"hyperparams": {"max_length": 512}, "data": {"max_tokens_per_batch": 512}})


def test_error_cross_field_from_cli_flag(tmp_path):
    path = write_json(tmp_path / "c.json", {"locked": {"max_context_length": 1024}})
    result = CliRunner().invoke(cli, ["config", "show", "--config", str(path),
                                      "--max-length", "2000"])
    assert result.exit_code == 2
    assert "hyperparams.max_length: must be <= locked.max_context_length (1024), got 2000" \
        in result.stderr


def test_error_config_version():
    assert config_error({"config_version": 2}) == "config_version: must be 1, got 2"


def test_several_errors_reported_together():
    msg = config_error({"hyperparams": {"batch_size": 0}, "data": {"packing": "yes"}})
    assert "hyperparams.batch_size: must be > 0" in msg
    assert "data.packing: expected true or false, got 'yes'" in msg


def test_malformed_json_names_file_line_col(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "hyperparams": {\n    "batch_size": 8,\n  }\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        resolve(file=path)
    assert str(info.value).startswith(f"{path}:4:3: invalid JSON")
    result = CliRunner().invoke(cli, ["config", "validate", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}:4:3: invalid JSON")


def test_missing_and_non_object_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        resolve(file=tmp_path / "nope.json")
    path = write_json(tmp_path / "list.json", [1, 2])
    with pytest.raises(ConfigError, match="expected a JSON object"):
        resolve(file=path)


# --------------------------------------------------------------------------- load_config API


def test_load_config_defaults():
    assert load_config() == TrainerConfig()
    # the public one is the same resolution, plus --set strings and the profile.options check
    assert trainer_core.load_config() == load_config()
    assert trainer_core.TrainerConfig is TrainerConfig


def test_load_config_file_and_overrides(tmp_path):
    path = write_json(tmp_path / "c.json", {"hyperparams": {"batch_size": 3, "seed": 5}})
    cfg = load_config(path, {"hyperparams.seed": 9, "data.packing": False})
    assert cfg.hyperparams.batch_size == 3  # file
    assert cfg.hyperparams.seed == 9  # override beats file
    assert cfg.data.packing is False
    assert cfg.hyperparams.learning_rate == 2e-5  # default, no preset in the API
    assert load_config(str(path)).hyperparams.seed == 5


def test_load_config_errors_name_file(tmp_path):
    path = write_json(tmp_path / "c.json", {"hyperparams": {"batch_size": -1}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: hyperparams.batch_size: must be > 0, got -1"
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(overrides={"nope.x": 1})
