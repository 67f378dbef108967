"""The ``trainer`` command line: exit codes, one-line errors, output formats, startup imports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from trainer_core import __version__
from trainer_core.cli import cli
from trainer_core.config import TrainerConfig, field_paths, flatten, resolve, to_dict
from trainer_core.demo import DEMO_HYPERPARAMS as DEMO_PRESET
from trainer_core.errors import ConfigError, UserError
from trainer_core.plugins.registry import ALLOW_ENV, reset_registry


@pytest.fixture(autouse=True)
def builtin_only(monkeypatch):
    """Only the built-in plugin, so installed third-party plugins can't change the output."""
    monkeypatch.setenv(ALLOW_ENV, "")
    reset_registry()
    yield
    reset_registry()


def invoke(*args: str, **kw):
    return CliRunner().invoke(cli, list(args), **kw)


def assert_one_line_error(result, exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- help and version


def test_help():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "profiles", "plugins", "config", "preview", "generate"):
        assert command in result.stdout
    assert invoke("-h").stdout == result.stdout


def test_subcommand_help():
    result = invoke("config", "show", "--help")
    assert result.exit_code == 0
    for flag in ("--config", "--set", "--bf16", "--batch-size", "--explain", "--no-packing"):
        assert flag in result.stdout


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


# --------------------------------------------------------------------------- config show


def test_config_show_is_json():
    result = invoke("config", "show")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(flatten(data)) == set(field_paths())
    # No model given: the demo preset applies.
    for dotted, value in DEMO_PRESET.items():
        assert flatten(data)[dotted] == value


def test_config_show_with_file_and_flags(tmp_path):
    path = write_json(tmp_path / "c.json", {"model": {"path": "m"},
                                            "hyperparams": {"batch_size": 3}})
    result = invoke("config", "show", "--config", str(path), "--bf16", "--no-packing",
                    "--set", "profile.options.system_prompt=hi", "--resume")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == to_dict(resolve(file=path, cli={
        "hyperparams.precision": "bf16", "data.packing": False,
        "profile.options.system_prompt": "hi", "output.resume": "latest"}).config)
    assert data["hyperparams"]["batch_size"] == 3
    assert data["hyperparams"]["learning_rate"] == TrainerConfig().hyperparams.learning_rate


def test_set_parses_json_values_else_text():
    result = invoke("config", "show", "--set", "hyperparams.max_steps=12",
                    "--set", "environment.report_to=[\"a\"]", "--set", "data.dataset=x.jsonl",
                    "--set", "hyperparams.warmup_steps=null")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["hyperparams"]["max_steps"] == 12
    assert data["environment"]["report_to"] == ["a"]
    assert data["data"]["dataset"] == "x.jsonl"
    assert data["hyperparams"]["warmup_steps"] is None


# --------------------------------------------------------------------------- errors


def test_set_bad_key():
    line = assert_one_line_error(invoke("config", "show", "--set", "hyperparams.batchsize=2"))
    assert line == ("error: hyperparams.batchsize: unknown setting "
                    "(did you mean 'hyperparams.batch_size'?)")


def test_set_without_equals():
    line = assert_one_line_error(invoke("config", "show", "--set", "hyperparams.batch_size"))
    assert "expected section.field=value" in line


def test_two_precision_flags():
    line = assert_one_line_error(invoke("config", "show", "--bf16", "--fp16"))
    assert "--bf16 and --fp16 cannot be combined" in line


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "error: hyperparams.batch_size: must be > 0, got 0"),
    (["--set", "hyperparams.lr_scheduler=cos"],
     "error: hyperparams.lr_scheduler: must be one of cosine, linear, constant, got 'cos'"),
    (["--set", "data.shuffle=1"], "error: data.shuffle: expected true or false, got 1"),
    (["--set", "hyperparams.batch_size=true"],
     "error: hyperparams.batch_size: expected an integer, got True"),
    (["--config", "/nonexistent/c.json"], "error: /nonexistent/c.json: file not found"),
])
def test_invalid_value_one_line(args, message):
    assert assert_one_line_error(invoke("config", "show", *args)) == message


def test_invalid_value_in_file_names_file(tmp_path):
    path = write_json(tmp_path / "c.json", {"hyperparams": {"warmup_ratio": 2}})
    line = assert_one_line_error(invoke("config", "show", "--config", str(path)))
    assert line == f"error: {path}: hyperparams.warmup_ratio: must be between 0 and 1, got 2.0"


def test_click_type_errors_exit_2():
    result = invoke("config", "show", "--batch-size", "many")
    assert result.exit_code == 2
    assert "'many' is not a valid integer" in result.stderr


def test_debug_lets_the_exception_propagate():
    with pytest.raises(ConfigError, match="hyperparams.batchsize: unknown setting"):
        invoke("--debug", "config", "show", "--set", "hyperparams.batchsize=2",
               catch_exceptions=False)
    result = invoke("--debug", "config", "show", "--bf16", "--fp16")
    assert isinstance(result.exception, UserError)
    assert result.exit_code == 1  # an uncaught exception, not the one-line exit 2
    assert "error: " not in result.stderr


def test_debug_traceback_in_a_real_process(tmp_path):
    code = "import trainer_core.cli as c; c.main(['--debug', 'config', 'show', '--bf16', '--fp16'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**_env(), ALLOW_ENV: ""})
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "UserError: --bf16 and --fp16 cannot be combined" in proc.stderr


# --------------------------------------------------------------------------- schema, validate


def test_config_schema_lists_every_field_with_doc():
    result = invoke("config", "schema")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    fields = field_paths()
    heads = [i for i, line in enumerate(lines) if not line.startswith(" ")]
    assert [lines[i].split(":")[0] for i in heads] == list(fields)
    for i in heads:
        doc = lines[i + 1]
        assert doc.startswith("    ") and len(doc.strip()) > 10, lines[i]
    assert "hyperparams.learning_rate: float = 2e-05" in lines
    assert "    Peak learning rate." in lines


def test_config_schema_json():
    result = invoke("config", "schema", "--json")
    assert result.exit_code == 0
    entries = json.loads(result.stdout)
    assert [e["field"] for e in entries] == list(field_paths())
    assert all(e["doc"] for e in entries)
    defaults = flatten(to_dict(TrainerConfig()))
    assert {e["field"]: e["default"] for e in entries} == defaults


def test_config_validate_ok(tmp_path):
    path = write_json(tmp_path / "ok.json", {
        "hyperparams": {"batch_size": 2},
        "profile": {"name": "plain_sft", "options": {"system_prompt": "Today is {date}."}},
    })
    result = invoke("config", "validate", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: ok\n"


@pytest.mark.parametrize("data,expected", [
    ({"hyperparams": {"batch_size": -2}}, "hyperparams.batch_size: must be > 0, got -2"),
    ({"profile": {"name": "nope"}}, "unknown profile 'nope'; available: plain_sft"),
    ({"profile": {"options": {"system_promt": "x"}}},
     "profile.options.system_promt: unknown key (did you mean 'system_prompt'?)"),
    ({"profile": {"options": {"system_prompt_mode": "always"}}},
     "profile.options.system_prompt_mode: must be one of replace, keep, none, got 'always'"),
])
def test_config_validate_invalid(tmp_path, data, expected):
    path = write_json(tmp_path / "bad.json", data)
    line = assert_one_line_error(invoke("config", "validate", str(path)))
    assert expected in line


# --------------------------------------------------------------------------- startup imports


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != ALLOW_ENV}


def test_light_commands_do_not_import_torch_or_transformers(tmp_path):
    """`trainer --help`, `profiles`, `plugins` and `config ...` stay fast: no torch import.

    Runs with the installed third-party plugins too (their modules must stay light as well).
    """
    path = write_json(tmp_path / "c.json", {"model": {"path": "m"}})
    code = textwrap.dedent(f"""
        import sys
        import trainer_core.cli
        commands = [
            ["--help"], ["profiles"], ["plugins"], ["plugins", "--json"], ["config", "show"],
            ["config", "show", "--explain", "--config", {str(path)!r}, "--bf16"],
            ["config", "schema"], ["config", "validate", {str(path)!r}],
        ]
        for argv in commands:
            try:
                trainer_core.cli.main(argv)
            except SystemExit as exc:
                assert exc.code in (0, None), (argv, exc.code)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        assert not heavy, heavy[:10]
        print("LIGHT-OK", file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LIGHT-OK" in proc.stderr
