"""The ``trainer`` command line (the top layer: it may import every other layer; nothing imports it).

One module per command family; this module builds the group. Startup must stay fast: nothing
here imports torch or transformers at module level; commands import them inside their bodies.
"""

from __future__ import annotations

from typing import Any

import click

from trainer_core import __version__
from trainer_core.cli.config_cmds import config_group
from trainer_core.cli.daemon_cmds import daemon_group
from trainer_core.cli.export_cmd import export
from trainer_core.cli.generate_cmd import generate
from trainer_core.cli.monitor_cmds import dashboard, plot, watch
from trainer_core.cli.options import TrainerGroup
from trainer_core.cli.plugin_cmds import new_profile, plugins, profiles
from trainer_core.cli.run_cmds import preview, run
from trainer_core.cli.serve_cmd import serve

# --------------------------------------------------------------------------- the group


@click.group(cls=TrainerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trainer")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """trainer: supervised fine-tuning of chat models with pluggable data profiles."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


for _command in (run, preview, generate, export, profiles, plugins, new_profile, config_group,
                 daemon_group, plot, watch, dashboard, serve):
    cli.add_command(_command)


# --------------------------------------------------------------------------- plugin commands


def _add_plugin_commands(group: click.Group) -> None:
    from trainer_core.plugins.registry import add_commands, get_registry

    add_commands(get_registry(), group)


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    _add_plugin_commands(cli)
    return cli.main(args=argv, prog_name="trainer")
