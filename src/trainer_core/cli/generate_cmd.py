"""``trainer generate``."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from trainer_core.errors import UserError


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Model directory: a trainer run, one of its checkpoints, or any local HF "
                   "model.")
@click.option("--profile", "profile_name", help="Profile (default: the run's, else plain_sft).")
@click.option("--prompt", help="A user message to answer.")
@click.option("--dataset", type=click.Path(dir_okay=False), help="JSONL of prompts to answer.")
@click.option("-n", "count", type=int, default=5, show_default=True, help="Rows of --dataset.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rows generated together; results are printed as each batch finishes.")
@click.option("--max-new-tokens", type=int, default=None,
              help="Generation length limit (default: the run's monitoring.max_new_tokens, "
                   "else sized from the reference answers).")
@click.option("--chat-template", default=None,
              help="chatml, tokenizer, or a Jinja file (default: the run's template, else "
                   "chatml).")
@click.option("--constrain", type=click.Choice(["strict", "soft", "off"]), default=None,
              help="Hold answers to the profile's format: strict (constrained decoding), soft "
                   "(the profile's processors) or off (default: the run's "
                   "monitoring.constrain, strict).")
@click.option("--no-processors", is_flag=True, help="Same as --constrain off.")
@click.option("--set", "sets", multiple=True, metavar="profile.options.KEY=VALUE",
              help="Override a profile option. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def generate(model_dir: str, profile_name: str | None, prompt: str | None, dataset: str | None,
             count: int, batch_size: int, max_new_tokens: int | None, chat_template: str | None,
             constrain: str | None, no_processors: bool, sets: tuple[str, ...], as_json: bool,
             quiet: bool) -> None:
    """Generate answers held to the profile's answer format; print scores (format_ok too)."""
    if (prompt is None) == (dataset is None):
        raise UserError("give exactly one of --prompt or --dataset")
    from trainer_core.config import parse_set
    from trainer_core.generate.generate import run_generate

    option_overrides = dict(parse_set(s) for s in sets)
    bar = RowProgress(sys.stderr) if dataset is not None and not quiet else None
    records = run_generate(model_dir, profile_name, prompt, dataset, count, max_new_tokens,
                           not no_processors, option_overrides, chat_template=chat_template,
                           batch_size=batch_size, progress=bar, constrain=constrain)
    try:
        for record in records:
            if bar is not None:
                bar.clear()
            if as_json:
                click.echo(json.dumps(record, ensure_ascii=False))
                continue
            click.echo(f"> {record['prompt']}")
            click.echo(record["output"])
            if record["scores"]:
                click.echo("  " + " ".join(f"{k}={v}" for k, v in record["scores"].items()))
            if record.get("format_failed"):
                click.echo(f"  format failed: {record['format_failed']}")
            click.echo("")
            sys.stdout.flush()
    finally:
        if bar is not None:
            bar.close()


class RowProgress:
    """``progress(done, total)`` for generation: a bar on a TTY, a line per batch otherwise."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.time()
        self._open = False

    def __call__(self, done: int, total: int) -> None:
        from trainer_core.monitor.progress import format_duration

        if done == 0:  # the model is loaded: time generation only
            self.start = time.time()
        elapsed = time.time() - self.start
        eta = elapsed / done * (total - done) if done else float("inf")
        filled = int(24 * done / max(total, 1))
        line = (f"[{'#' * filled}{'-' * (24 - filled)}] {done}/{total} rows "
                f"{format_duration(elapsed)} elapsed, ETA {format_duration(eta)}")
        if self.tty:
            self.stream.write("\r" + line)
            self._open = True
        elif done:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the bar so a result printed to the same terminal starts on a clean line."""
        if self._open:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._open = False

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
