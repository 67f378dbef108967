"""Config files in YAML: the same schema, precedence and provenance as JSON; errors name the
line of the key."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from trainer_core.cli import cli
from trainer_core.config import from_dict, resolve, to_dict
from trainer_core.errors import ConfigError

RUN = """\
# a run
hyperparams:
  batch_size: 4
  learning_rate: 0.0001

data:
  dataset: chats.parquet
  format: sharegpt
  roles: {bot: assistant}
profile:
  name: plain_sft
  options: {}
"""


def test_yaml_and_json_give_the_same_config_and_sources(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text(RUN, encoding="utf-8")
    j = tmp_path / "run.json"
    j.write_text(json.dumps(yaml.safe_load(RUN)), encoding="utf-8")
    from_yaml = resolve(file=y, cli={"hyperparams.batch_size": 8})
    from_json = resolve(file=j, cli={"hyperparams.batch_size": 8})
    assert from_yaml.config == from_json.config
    assert from_yaml.sources == from_json.sources
    assert from_yaml.config.hyperparams.batch_size == 8  # the command line wins
    assert from_yaml.sources["hyperparams.learning_rate"] == "file"
    assert from_yaml.config.data.roles == {"bot": "assistant"}


@pytest.mark.parametrize("text, message", [
    ("hyperparams:\n  batch_size: 2\n\n\n  lr: 0.1\n",
     "run.yaml:5: hyperparams.lr: unknown key (did you mean 'learning_rate'?)"),
    ("data:\n  format: sharegpt\nhyperparams:\n  batch_size: 1.5\n",
     "run.yaml:4: hyperparams.batch_size: expected an integer, got 1.5"),
    ("data:\n  columns:\n    dialog: x\n",
     "run.yaml:2: data.columns: must be in"),
    ("hyperparams:\n  batch_size: 2\n  batch_size: 3\n",
     "run.yaml:3: hyperparams.batch_size: given twice (first on line 2)"),
    ("hyperparams: [1,\n", "run.yaml:2:1: invalid YAML: "),
    ("on: 1\n", "run.yaml:1: key 'on' is not read as text by YAML; quote it"),
    ("a: &x [1, 2]\nb: *x\n", "run.yaml:1: this value is used again through an alias"),
    ("- 1\n- 2\n", "run.yaml: expected a YAML mapping at the top level"),
])
def test_yaml_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        resolve(file=path)
    assert str(info.value).startswith(f"{tmp_path}/{message}"), str(info.value)
    result = CliRunner().invoke(cli, ["config", "validate", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path}/{message}")


def test_config_show_format_yaml_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN, encoding="utf-8")
    shown = CliRunner().invoke(cli, ["config", "show", "--config", str(path), "--format",
                                     "yaml", "--model", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.startswith("config_version: 1\nhyperparams:\n  batch_size: 4\n")
    data = yaml.safe_load(shown.stdout)
    assert data == to_dict(from_dict(data))
    assert data["data"]["format"] == "sharegpt"
    as_json = CliRunner().invoke(cli, ["config", "show", "--config", str(path), "--model",
                                       str(tmp_path)])
    assert json.loads(as_json.stdout) == data
