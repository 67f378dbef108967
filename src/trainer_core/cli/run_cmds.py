"""``trainer run`` and ``trainer preview``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from trainer_core.cli.options import config_options, resolve_run_config


@click.command()
@config_options
@click.option("--dry-run", is_flag=True, help="Print the run plan and exit.")
@click.option("--unlock", is_flag=True,
              help="Continue in an output directory locked to another model.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or preview lines.")
@click.option("--json", "json_summary", is_flag=True, help="Print the final summary as JSON.")
def run(config_file: str | None, overrides: dict[str, Any], dry_run: bool, unlock: bool,
        quiet: bool, json_summary: bool) -> None:
    """Fine-tune a model. With no --model and no --dataset: the embedded tiny demo."""
    from trainer_core.plugins.registry import get_profile_class

    resolved = resolve_run_config(config_file, overrides)
    get_profile_class(resolved.config.profile.name)  # unknown profile: exit 2 before any work
    from trainer_core.train.recipe import run_training

    summary = run_training(resolved, dry_run=dry_run, unlock=unlock, quiet=quiet)
    if json_summary:
        click.echo(json.dumps(summary, indent=2, default=str))
    if summary.get("state") not in (None, "completed", "planned"):
        if quiet:  # the console listener printed the reason otherwise
            from trainer_core.errors import RunFailure

            raise RunFailure(summary.get("reason") or f"run {summary.get('state')}")
        sys.exit(1)


@click.command()
@config_options
@click.option("-n", "count", type=int, default=3, show_default=True, help="Examples to show.")
@click.option("--color/--no-color", default=None, help="Colour trained tokens (default: on a TTY).")
def preview(config_file: str | None, overrides: dict[str, Any], count: int,
            color: bool | None) -> None:
    """Show transformed examples with the trained tokens highlighted."""
    resolved = resolve_run_config(config_file, overrides)
    use_color = sys.stdout.isatty() if color is None else color
    # color= tells click to keep the escape codes it would strip when stdout is not a TTY.
    click.echo(preview_text(resolved.config, count, use_color), color=use_color)


def preview_text(cfg: Any, count: int, color: bool) -> str:
    """Transformed examples with trained tokens highlighted (no model is loaded)."""
    from trainer_core.data.preview import preview_examples
    from trainer_core.data.tokenizer import load_tokenizer
    from trainer_core.plugins.registry import build_profile
    from trainer_core.train.inputs import load_rows

    profile = build_profile(cfg)
    train_rows, _, _ = load_rows(cfg)
    # No model given: the demo model uses the bundled tokenizer, so there is no need to build it.
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path,
                               trust_remote_code=cfg.model.trust_remote_code)
    return preview_examples(train_rows, profile, tokenizer, cfg.model.chat_template, count,
                            cfg.data.seed, color=color)


