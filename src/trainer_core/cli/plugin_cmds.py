"""``trainer profiles`` and ``trainer plugins``."""

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
def plugins(as_json: bool) -> None:
    """List plugins: distribution, version, hooks implemented, status."""
    import attrs

    from trainer_core.plugins.registry import get_registry

    infos = list(get_registry().plugins.values())
    if as_json:
        click.echo(json.dumps([attrs.asdict(i) for i in infos], indent=2))
        return
    rows = [("PLUGIN", "DISTRIBUTION", "VERSION", "HOOKS", "STATUS")]
    for i in infos:
        status = i.status if not i.error else f"{i.status}: {i.error}"
        rows.append((i.name, i.distribution, i.version, ",".join(i.hooks) or "-", status))
    table(rows)
