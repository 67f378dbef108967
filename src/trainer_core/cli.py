"""The ``trainer`` command line.

Startup must stay fast: nothing here imports torch or transformers at module level; commands
that need them import inside their bodies.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from trainer_core import __version__
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


# --------------------------------------------------------------------------- the group


@click.group(cls=TrainerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trainer")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """trainer: supervised fine-tuning of chat models with pluggable data profiles."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command()
@config_options
@click.option("--dry-run", is_flag=True, help="Print the run plan and exit.")
@click.option("--unlock", is_flag=True,
              help="Continue in an output directory locked to another model.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or preview lines.")
@click.option("--json", "json_summary", is_flag=True, help="Print the final summary as JSON.")
def run(config_file: str | None, overrides: dict[str, Any], dry_run: bool, unlock: bool,
        quiet: bool, json_summary: bool) -> None:
    """Fine-tune a model. With no --model and no --dataset: the embedded tiny demo."""
    from trainer_core.plugins import get_profile_class

    resolved = resolve_run_config(config_file, overrides)
    get_profile_class(resolved.config.profile.name)  # unknown profile: exit 2 before any work
    from trainer_core import engine

    summary = engine.run_training(resolved, dry_run=dry_run, unlock=unlock, quiet=quiet)
    if json_summary:
        click.echo(json.dumps(summary, indent=2, default=str))
    if summary.get("state") not in (None, "completed", "planned"):
        sys.exit(1)


@cli.command()
def profiles() -> None:
    """List installed data profiles."""
    from trainer_core.plugins import get_registry

    registry = get_registry()
    rows = [("NAME", "VERSION", "DISTRIBUTION", "DESCRIPTION")]
    for name in sorted(registry.profiles):
        e = registry.profiles[name]
        rows.append((name, e.cls.version, f"{e.distribution} {e.version}", e.cls.description))
    _table(rows)
    for name, owners in sorted(registry.conflicts.items()):
        click.echo(f"warning: profile {name!r} registered by {', '.join(owners)}", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List plugins: distribution, version, hooks implemented, status."""
    import attrs

    from trainer_core.plugins import get_registry

    infos = list(get_registry().plugins.values())
    if as_json:
        click.echo(json.dumps([attrs.asdict(i) for i in infos], indent=2))
        return
    rows = [("PLUGIN", "DISTRIBUTION", "VERSION", "HOOKS", "STATUS")]
    for i in infos:
        status = i.status if not i.error else f"{i.status}: {i.error}"
        rows.append((i.name, i.distribution, i.version, ",".join(i.hooks) or "-", status))
    _table(rows)


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        cells = [str(c).ljust(w) for c, w in zip(r, widths, strict=False)] + [str(r[-1])]
        click.echo("  ".join(cells).rstrip())


# --------------------------------------------------------------------------- config commands


@cli.group("config")
def config_group() -> None:
    """Show, validate, describe and migrate configuration."""


@config_group.command("show")
@config_options
@click.option("--explain", is_flag=True, help="Show where each value came from.")
def config_show(config_file: str | None, overrides: dict[str, Any], explain: bool) -> None:
    """Print the resolved config (defaults < demo preset < file < CLI)."""
    from trainer_core.config import flatten, to_dict

    resolved = resolve_run_config(config_file, overrides)
    data = to_dict(resolved.config)
    if not explain:
        click.echo(json.dumps(data, indent=2))
        return
    flat = flatten(data)
    width = max(len(k) for k in flat)
    for key, value in flat.items():
        source = resolved.sources.get(key, "default")
        click.echo(f"{key.ljust(width)}  {json.dumps(value):<30}  {source}")


@config_group.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
def config_validate(file: str) -> None:
    """Check a JSON config file; exit 2 with the problem if it is invalid."""
    from trainer_core.config import resolve

    resolved = resolve(file=file)
    from trainer_core.plugins import get_profile_class

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
def config_migrate(old: str, new: str, force: bool) -> None:
    """Convert an old flat config file into the current format."""
    from trainer_core.config import read_config_file
    from trainer_core.migrate import migrate

    new_path = Path(new)
    if new_path.exists() and not force:
        raise UserError(f"{new}: already exists (use --force to overwrite)")
    result = migrate(read_config_file(old))
    new_path.write_text(json.dumps(result.config, indent=2) + "\n", encoding="utf-8")
    click.echo(f"wrote {new}")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.unmapped:
        side = new_path.with_name(new_path.stem + ".unmapped.json")
        side.write_text(json.dumps(result.unmapped, indent=2) + "\n", encoding="utf-8")
        click.echo(f"{len(result.unmapped)} key(s) have no place in the new format; kept in "
                   f"{side}:", err=True)
        for key, value in result.unmapped.items():
            click.echo(f"  {key} = {json.dumps(value)}", err=True)


# --------------------------------------------------------------------------- data commands


@cli.command()
@config_options
@click.option("-n", "count", type=int, default=3, show_default=True, help="Examples to show.")
@click.option("--color/--no-color", default=None, help="Colour trained tokens (default: on a TTY).")
def preview(config_file: str | None, overrides: dict[str, Any], count: int,
            color: bool | None) -> None:
    """Show transformed examples with the trained tokens highlighted."""
    from trainer_core import engine

    resolved = resolve_run_config(config_file, overrides)
    use_color = sys.stdout.isatty() if color is None else color
    click.echo(engine.preview_text(resolved.config, count, use_color))


@cli.command()
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
    from trainer_core.generate_cmd import run_generate

    option_overrides = dict(parse_set(s) for s in sets)
    run_generate(model_dir, profile_name, prompt, dataset, count, max_new_tokens,
                 not no_processors, option_overrides, as_json)


# --------------------------------------------------------------------------- plugin commands


def _add_plugin_commands(group: click.Group) -> None:
    from trainer_core.plugins import get_registry

    registry = get_registry()
    for impl in registry.pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(cli=group)
        except Exception as exc:  # a broken plugin must not break the CLI
            info = registry.plugins.get(impl.plugin_name)
            if info is not None:
                info.status, info.error = "broken", f"register_commands: {exc}"


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    _add_plugin_commands(cli)
    return cli.main(args=argv, prog_name="trainer")


if __name__ == "__main__":  # pragma: no cover
    main()
