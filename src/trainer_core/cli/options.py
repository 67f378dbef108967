"""What every command shares: one-line errors (exit 2), the config flags, resolution."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import click

from trainer_core.errors import UserError

# --------------------------------------------------------------------------- error handling


class TrainerGroup(click.Group):
    """A click group that turns ``UserError`` into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


# --------------------------------------------------------------------------- shared config flags

#: Typed flags -> dotted config path. Every flag defaults to None so that a flag the user did
#: not pass never overrides the JSON file.
TYPED_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--dataset", "data.dataset", str, "Training JSONL file."),
    ("--validation", "data.validation", str, "Validation JSONL file."),
    ("--model", "model.path", str, "Local Hugging Face model directory."),
    ("--tokenizer", "model.tokenizer", str, "Tokenizer directory (default: the model's)."),
    ("--output-dir", "output.output_dir", str, "Run directory."),
    ("--profile", "profile.name", str, "Data profile (see `trainer profiles`)."),
    ("--batch-size", "hyperparams.batch_size", int, "Examples per micro-batch."),
    ("--grad-accum", "hyperparams.gradient_accumulation", int, "Micro-batches per step."),
    ("--learning-rate", "hyperparams.learning_rate", float, "Peak learning rate."),
    ("--epochs", "hyperparams.num_epochs", float, "Passes over the data."),
    ("--max-steps", "hyperparams.max_steps", int, "Optimizer steps (overrides --epochs)."),
    ("--max-length", "hyperparams.max_length", int, "Longest example in tokens."),
    ("--seed", "hyperparams.seed", int, "Training seed."),
    ("--save-steps", "hyperparams.save_steps", int, "Checkpoint every N steps."),
    ("--eval-steps", "hyperparams.eval_steps", int, "Validation loss every N steps."),
    ("--chat-template", "model.chat_template", str, "chatml, tokenizer, or a Jinja file."),
]


def config_options(func: Callable) -> Callable:
    """Add ``--config``, the typed flags, precision flags and ``--set`` to a command."""
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="JSON config file (CLI flags override it)."),
        *[
            click.option(flag, "flag_" + dotted.replace(".", "__"), type=typ, default=None,
                         help=text)
            for flag, dotted, typ, text in TYPED_FLAGS
        ],
        click.option("--bf16", "flag_bf16", is_flag=True, default=None,
                     help="hyperparams.precision=bf16."),
        click.option("--fp16", "flag_fp16", is_flag=True, default=None,
                     help="hyperparams.precision=fp16."),
        click.option("--fp32", "flag_fp32", is_flag=True, default=None,
                     help="hyperparams.precision=fp32."),
        click.option("--packing/--no-packing", "flag_packing", default=None,
                     help="data.packing (default on)."),
        click.option("--resume", "flag_resume", is_flag=True, default=None,
                     help="Resume from the newest checkpoint in the output directory."),
        click.option("--resume-from", "flag_resume_from", type=click.Path(),
                     help="Resume from this checkpoint directory."),
        click.option("--overwrite", "flag_overwrite", is_flag=True, default=None,
                     help="Replace the run the output directory holds (output.overwrite; a run "
                          "directory only)."),
        click.option("--allow-changes", "flag_allow_changes", metavar="KINDS",
                     help="On resume, accept these changed settings, e.g. lr,data "
                          "(output.allow_changes)."),
        click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE",
                     help="Set any config field (value parsed as JSON, else text). Repeatable."),
    ]
    for option in reversed(options):
        func = option(func)

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        overrides = cli_overrides(kwargs)
        config_file = kwargs.pop("config_file")
        return func(config_file=config_file, overrides=overrides, **kwargs)

    return wrapper


def cli_overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Collect only the flags the user actually passed, as dotted overrides (pops them)."""
    from trainer_core.config import parse_set

    out: dict[str, Any] = {}
    for _, dotted, _, _ in TYPED_FLAGS:
        value = kwargs.pop("flag_" + dotted.replace(".", "__"))
        if value is not None:
            out[dotted] = value
    precisions = [p for p in ("bf16", "fp16", "fp32") if kwargs.pop(f"flag_{p}")]
    if len(precisions) > 1:
        raise UserError(f"--{' and --'.join(precisions)} cannot be combined; choose one precision")
    if precisions:
        out["hyperparams.precision"] = precisions[0]
    packing = kwargs.pop("flag_packing")
    if packing is not None:
        out["data.packing"] = packing
    resume, resume_from = kwargs.pop("flag_resume"), kwargs.pop("flag_resume_from")
    if resume_from:
        out["output.resume"] = resume_from
    elif resume:
        out["output.resume"] = "latest"
    if kwargs.pop("flag_overwrite"):
        out["output.overwrite"] = True
    changes = kwargs.pop("flag_allow_changes")
    if changes is not None:
        out["output.allow_changes"] = [c.strip() for c in changes.split(",") if c.strip()]
    for item in kwargs.pop("sets"):
        key, value = parse_set(item)
        out[key] = value
    return out


def resolve_run_config(config_file: str | None, overrides: dict[str, Any]):
    """Defaults < demo preset (only without a model) < file < CLI."""
    from trainer_core.config import resolve

    resolved = resolve(file=config_file, cli=overrides)
    if resolved.config.model.path is None:
        from trainer_core.demo import DEMO_HYPERPARAMS

        resolved = resolve(file=config_file, cli=overrides, preset=DEMO_HYPERPARAMS)
    return resolved




def table(rows: Sequence[tuple[str, ...]]) -> None:
    """Print rows as left-aligned columns (the last column is not padded)."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        cells = [str(c).ljust(w) for c, w in zip(r, widths, strict=False)] + [str(r[-1])]
        click.echo("  ".join(cells).rstrip())
