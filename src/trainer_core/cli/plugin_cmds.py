"""``trainer profiles``, ``trainer plugins`` and ``trainer new-profile``."""

from __future__ import annotations

import json

import click

from trainer_core.cli.options import table


@click.command()
def profiles() -> None:
    """List installed data profiles."""
    from trainer_core.plugins.registry import get_registry

    registry = get_registry()
    rows = [("NAME", "VERSION", "DISTRIBUTION", "DESCRIPTION")]
    for name in sorted(registry.profiles):
        e = registry.profiles[name]
        rows.append((name, e.cls.version, f"{e.distribution} {e.version}", e.cls.description))
    table(rows)
    for name, owners in sorted(registry.conflicts.items()):
        click.echo(f"warning: profile {name!r} registered by {', '.join(owners)}", err=True)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--requirements", "as_requirements", is_flag=True,
              help="Pinned NAME==VERSION lines of the loaded plugins (or of --run's), for pip.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False),
              help="With --requirements: the plugins recorded in this run's run.json.")
def plugins(as_json: bool, as_requirements: bool, run_dir: str | None) -> None:
    """List plugins: distribution, version, hooks implemented, status."""
    import attrs

    from trainer_core.errors import UserError
    from trainer_core.plugins.registry import get_registry, requirements

    if run_dir is not None and not as_requirements:
        raise UserError("--run goes with --requirements")
    if as_requirements:
        recorded = None
        if run_dir is not None:
            from pathlib import Path

            from trainer_core.generate.generate import run_manifest

            manifest = run_manifest(Path(run_dir))
            if not manifest:
                raise UserError(f"--run {run_dir}: no run.json there")
            recorded = manifest.get("plugins") or []
        for line in requirements(recorded):
            click.echo(line)
        return
    infos = list(get_registry().plugins.values())
    if as_json:
        click.echo(json.dumps([attrs.asdict(i) for i in infos], indent=2))
        return
    rows = [("PLUGIN", "DISTRIBUTION", "VERSION", "HOOKS", "STATUS")]
    for i in infos:
        status = i.status if not i.error else f"{i.status}: {i.error}"
        if i.notes:
            status += f" (deprecated: {len(i.notes)} v1 declaration(s), see --json)"
        rows.append((i.name, i.distribution, i.version, ",".join(i.hooks) or "-", status))
    table(rows)


@click.command("new-profile")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".",
              show_default=True, help="Where to create the trainer-NAME folder.")
def new_profile(name: str, directory: str) -> None:
    """Create a complete, installable profile plugin: trainer-NAME/ with pyproject, package,
    README and passing tests. `pip install -e trainer-NAME` and `trainer profiles` lists it."""
    from trainer_core.monitor.console import venv_tool
    from trainer_core.scaffold import write_plugin

    root = write_plugin(name, directory)
    click.echo(f"created {root}")
    pip, trainer, python = (venv_tool(t) for t in ("pip", "trainer", "python"))
    click.echo(f"next: {pip} install -e {root} && {trainer} profiles && "
               f"{trainer} preview --profile {name} -n 1 && {python} -m pytest {root}")

