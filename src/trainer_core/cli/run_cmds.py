"""``trainer run`` and ``trainer preview``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from trainer_core.cli.options import config_options, resolve_run_config


@click.command()
@config_options
@click.option("--dry-run", is_flag=True,
              help="Print the run plan (on stderr) and exit; the resolved config too with "
                   "--verbose, or as the summary's `config` key with --json.")
@click.option("--verbose", "-v", is_flag=True,
              help="With --dry-run: print the resolved config (JSON) after the plan.")
@click.option("--unlock", is_flag=True,
              help="Continue in an output directory locked to another model.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or preview lines.")
@click.option("--json", "json_summary", is_flag=True,
              help="Print the final summary (the plan with --dry-run) as JSON on stdout.")
@click.option("--nproc", "--gpus", "nproc", type=click.IntRange(min=1), default=None,
              help="Train in N processes on this node (one per GPU) by starting torchrun; "
                   "prints the equivalent torchrun command. See docs/distributed.md.")
def run(config_file: str | None, overrides: dict[str, Any], dry_run: bool, verbose: bool,
        unlock: bool, quiet: bool, json_summary: bool, nproc: int | None) -> None:
    """Fine-tune a model. With no --model and no --dataset: the embedded tiny demo.

    Progress, the summary and the --dry-run plan go to stderr; stdout holds only what --json
    asks for, so it can be piped."""
    from trainer_core.plugins.registry import get_profile_class

    resolved = resolve_run_config(config_file, overrides)
    get_profile_class(resolved.config.profile.name)  # unknown profile: exit 2 before any work
    if nproc is not None and nproc > 1 and not dry_run:
        from trainer_core.train.distributed import launched_by_torchrun

        if not launched_by_torchrun():
            sys.exit(launch_torchrun(nproc, sys.argv[1:]))
    from trainer_core.train.recipe import run_training

    summary = run_training(resolved, dry_run=dry_run, unlock=unlock, quiet=quiet)
    if dry_run and (verbose or json_summary):
        from trainer_core.config import to_dict

        config = to_dict(resolved.config)
        if verbose:
            click.echo("config\n" + json.dumps(config, indent=2), err=True)
        summary = {**summary, "config": config}
    if summary.get("world_size", 1) > 1 and _rank() != 0:
        json_summary = False  # rank 0 prints for the job
    if json_summary:
        click.echo(json.dumps(summary, indent=2, default=str))
    if summary.get("state") not in (None, "completed", "planned"):
        if quiet:  # the console listener printed the reason otherwise
            from trainer_core.errors import RunFailure

            raise RunFailure(summary.get("reason") or f"run {summary.get('state')}")
        sys.exit(1)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` minus ``--nproc N`` / ``--gpus N`` (and their ``=N`` forms)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--nproc", "--gpus"):
            skip = True
            continue
        if arg.startswith(("--nproc=", "--gpus=")):
            continue
        out.append(arg)
    return out


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this same command under torchrun in ``nproc`` processes; returns its exit code.

    torchrun gets a session of its own, so a Ctrl-C here reaches the workers once (as
    torchrun's SIGTERM): they agree on the step, rank 0 checkpoints, all exit.
    """
    import shlex
    import signal
    import subprocess

    from trainer_core.train.distributed import torchrun_command

    cmd = torchrun_command(nproc, without_nproc(argv))
    shown = ["torchrun", *cmd[3:]]
    click.echo(f"running: {shlex.join(shown)}", err=True)
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


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


