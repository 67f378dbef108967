"""``trainer generate``."""

from __future__ import annotations

import json

import click

from trainer_core.errors import UserError


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Model directory (a trainer output directory or any local HF model).")
@click.option("--profile", "profile_name", help="Profile (default: the run's, else plain_sft).")
@click.option("--prompt", help="A user message to answer.")
@click.option("--dataset", type=click.Path(dir_okay=False), help="JSONL of prompts to answer.")
@click.option("-n", "count", type=int, default=5, show_default=True, help="Rows of --dataset.")
@click.option("--max-new-tokens", type=int, default=None, help="Generation length limit.")
@click.option("--no-processors", is_flag=True, help="Generate without the profile's processors.")
@click.option("--set", "sets", multiple=True, metavar="profile.options.KEY=VALUE",
              help="Override a profile option. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per output.")
def generate(model_dir: str, profile_name: str | None, prompt: str | None, dataset: str | None,
             count: int, max_new_tokens: int | None, no_processors: bool, sets: tuple[str, ...],
             as_json: bool) -> None:
    """Generate answers with a model and its profile's logits processors; print scores."""
    if (prompt is None) == (dataset is None):
        raise UserError("give exactly one of --prompt or --dataset")
    from trainer_core.config import parse_set
    from trainer_core.generate.generate import run_generate

    option_overrides = dict(parse_set(s) for s in sets)
    records = run_generate(model_dir, profile_name, prompt, dataset, count, max_new_tokens,
                           not no_processors, option_overrides)
    for record in records:
        if as_json:
            click.echo(json.dumps(record, ensure_ascii=False))
            continue
        click.echo(f"> {record['prompt']}")
        click.echo(record["output"])
        if record["scores"]:
            click.echo("  " + " ".join(f"{k}={v}" for k, v in record["scores"].items()))
        click.echo("")


