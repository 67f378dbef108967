"""``trainer config show|validate|schema|migrate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from trainer_core.cli.options import config_options, resolve_run_config
from trainer_core.errors import UserError


@click.group("config")
def config_group() -> None:
    """Show, validate, describe and migrate configuration."""


def dump_config(data: dict[str, Any], fmt: str) -> str:
    """A config dict as JSON or YAML text (keys in schema order), ending in a newline."""
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return json.dumps(data, indent=2) + "\n"


@config_group.command("show")
@config_options
@click.option("--explain", is_flag=True, help="Show where each value came from.")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml"]), default="json",
              show_default=True, help="Print the config as JSON or YAML.")
def config_show(config_file: str | None, overrides: dict[str, Any], explain: bool,
                fmt: str) -> None:
    """Print the resolved config (defaults < demo preset < file < CLI)."""
    from trainer_core.config import flatten, to_dict

    resolved = resolve_run_config(config_file, overrides)
    data = to_dict(resolved.config)
    if not explain:
        click.echo(dump_config(data, fmt), nl=False)
        return
    flat = flatten(data)
    width = max(len(k) for k in flat)
    for key, value in flat.items():
        source = resolved.sources.get(key, "default")
        click.echo(f"{key.ljust(width)}  {json.dumps(value):<30}  {source}")


@config_group.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
def config_validate(file: str) -> None:
    """Check a config file (JSON, or YAML); exit 2 with the problem if it is invalid."""
    from trainer_core.config import resolve

    resolved = resolve(file=file)
    from trainer_core.plugins.registry import get_profile_class

    profile_cls = get_profile_class(resolved.config.profile.name)
    profile_cls.from_options(resolved.config.profile.options)
    click.echo(f"{file}: ok")


@config_group.command("schema")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config_schema(as_json: bool) -> None:
    """Print every config field with its type, default and documentation."""
    from trainer_core.config import schema

    fields = schema()
    if as_json:
        click.echo(json.dumps(fields, indent=2))
        return
    for f in fields:
        click.echo(f"{f['field']}: {f['type']} = {json.dumps(f['default'])}")
        click.echo(f"    {f['doc']}")


@config_group.command("migrate")
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite NEW if it exists.")
@click.option("--from", "source", type=click.Choice(["old", "axolotl", "llamafactory"]),
              default="old", show_default=True,
              help="What OLD is: trainer's old flat config, or an Axolotl or LLaMA-Factory SFT "
                   "YAML.")
def config_migrate(old: str, new: str, force: bool, source: str) -> None:
    """Convert an old flat config, or an Axolotl / LLaMA-Factory YAML, into the current format.

    NEW is written as YAML when it is named *.yaml or *.yml, else as JSON. Keys that have no
    place are listed and kept in NEW's stem + ".unmapped.json"."""
    from trainer_core.config import read_config_file
    from trainer_core.config.migrate import MIGRATIONS
    from trainer_core.config.sources import is_yaml

    new_path = Path(new)
    if new_path.exists() and not force:
        raise UserError(f"{new}: already exists (use --force to overwrite)")
    result = MIGRATIONS[source](read_config_file(old), Path(old))
    new_path.write_text(dump_config(result.config, "yaml" if is_yaml(new_path) else "json"),
                        encoding="utf-8")
    click.echo(f"wrote {new}")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.unmapped:
        side = new_path.with_name(new_path.stem + ".unmapped.json")
        side.write_text(json.dumps(result.unmapped, indent=2, default=str) + "\n",
                        encoding="utf-8")
        click.echo(f"{len(result.unmapped)} key(s) have no place in the new format; kept in "
                   f"{side}:", err=True)
        for key, value in result.unmapped.items():
            click.echo(f"  {key} = {json.dumps(value, default=str)}", err=True)


