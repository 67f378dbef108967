"""``trainer daemon start|submit|status|pause|resume|stop|skip|retry|history``."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import click

HOME_HELP = "The daemon's home directory (default: $TRAINER_DAEMON_HOME)."


def home_option(func: Any) -> Any:
    return click.option("--home", "home", envvar="TRAINER_DAEMON_HOME", required=True,
                        type=click.Path(file_okay=False), help=HOME_HELP)(func)


def _home(path: str) -> Any:
    from trainer_core.daemon.home import Home

    return Home(path)


@click.group("daemon")
def daemon_group() -> None:
    """Continuous training on the files dropped into a home's inbox (see README)."""


@daemon_group.command("start")
@home_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="JSON config (the same as `trainer run`'s, with a `daemon` section). "
                   "Default: the home's config.json from the last start, else the demo.")
@click.option("--model", "model", type=click.Path(file_okay=False),
              help="Local Hugging Face model directory (default: the embedded tiny model).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Set any config field. Repeatable.")
@click.option("--allow-changes", "allow_changes", metavar="KINDS",
              help="Accept these changed settings on a restart, e.g. lr,batch (the kinds of "
                   "`trainer run --resume`; the new values are then used).")
@click.option("--detach", is_flag=True, help="Run in the background (output in logs/).")
@click.option("--detached-child", is_flag=True, hidden=True)
@click.option("--nproc", "--gpus", "nproc", type=click.IntRange(min=1), default=None,
              help="Train in N processes on this node (one per GPU): the worker runs under "
                   "torchrun, as with `trainer run --nproc N` (sets daemon.nproc). See "
                   "docs/distributed.md.")
def start(home: str, config_file: str | None, model: str | None, sets: tuple[str, ...],
          allow_changes: str | None, detach: bool, detached_child: bool, nproc: int | None
          ) -> None:
    """Run the daemon on HOME (in the foreground unless --detach; Ctrl-C stops it cleanly).

    Without --config, a home's own config.json is the base and --model/--set change it; a
    change to what shapes training is refused unless accepted with --allow-changes, another
    model always (checked before anything is saved)."""
    from trainer_core.config import parse_set, read_recorded_config, resolve
    from trainer_core.daemon.home import daemon_running

    h = _home(home)
    pid = daemon_running(h)
    if pid:
        from trainer_core.errors import UserError

        raise UserError(f"{h.root}: a daemon is already running here (pid {pid})")
    overrides = dict(parse_set(s) for s in sets)
    if model:
        overrides["model.path"] = model
    if allow_changes:
        overrides["output.allow_changes"] = [c.strip() for c in allow_changes.split(",")
                                             if c.strip()]
    if config_file is None and h.config.exists():
        # The home's record of the last start, never its permissions (trust_remote_code
        # only from this command line).
        cfg = resolve(file_data=read_recorded_config(h.config), cli=overrides).config
    else:
        from trainer_core.cli.options import resolve_run_config

        cfg = resolve_run_config(config_file, overrides).config
    if nproc is not None:  # on top of whichever config was chosen (the home's one too)
        import attrs

        cfg = attrs.evolve(cfg, daemon=attrs.evolve(cfg.daemon, nproc=nproc))
    from trainer_core.plugins.registry import get_profile_class

    get_profile_class(cfg.profile.name)  # unknown profile: exit 2 before anything starts
    from trainer_core.daemon.control import precheck_start

    precheck_start(h, cfg)  # refusals before anything is saved (again under the lock)
    if detach:
        from trainer_core.daemon.control import start_detached

        pid = start_detached(h, cfg)
        click.echo(f"daemon started in {h.root} (pid {pid}); "
                   f"`trainer daemon status --home {home}` shows it")
        return
    from trainer_core.daemon.service import Daemon

    output = None
    if detached_child:  # started by --detach: the config file was this start's own
        from trainer_core.daemon.control import detached_output

        if config_file:
            Path(config_file).unlink(missing_ok=True)
        output = detached_output(h)
    click.echo(f"trainer daemon on {h.root}: drop data files (.jsonl .json .parquet .csv "
               f".tsv) into {h.inbox}/ or run `trainer daemon submit --home {home} FILE`; "
               "Ctrl-C stops", err=True)
    sys.exit(Daemon(h, cfg, stream=sys.stderr, output=output).run())


@daemon_group.command("submit")
@home_option
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), default="normal",
              show_default=True)
@click.option("--force", is_flag=True, help="Queue it even if the same content was trained.")
@click.option("--sample-data", is_flag=True, help="Submit the bundled sample conversations.")
def submit(home: str, files: tuple[str, ...], priority: str, force: bool,
           sample_data: bool) -> None:
    """Copy FILES into the queue atomically (exit 1 if one was a duplicate)."""
    from trainer_core.daemon.control import submit_files
    from trainer_core.errors import UserError

    paths = [Path(f) for f in files]
    if sample_data:
        from trainer_core.demo import sample_dataset_path

        paths.append(sample_dataset_path())
    if not paths:
        raise UserError("submit: name at least one file (or pass --sample-data)")
    rows = submit_files(_home(home), paths, priority, force)
    dup = False
    for row in rows:
        if row["state"] == "queued":
            click.echo(f"#{row['id']} {row['name']}: queued ({priority})")
        else:
            dup = dup or row["duplicate_of"] is not None
            click.echo(f"#{row['id']} {row['name']}: {row['state']}: {row['error']}", err=True)
    if dup:
        sys.exit(1)


@daemon_group.command("status")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(home: str, as_json: bool) -> None:
    """State, current file and progress, queue by priority, last results, disk."""
    from trainer_core.daemon.control import status as get_status

    data = get_status(_home(home))
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    model = data.get("model") or {}
    line = f"state: {data.get('state')}"
    if data.get("pid"):
        line += f" (pid {data['pid']})"
    if data.get("paused"):
        line += ", paused"
    click.echo(line)
    click.echo(f"model: step {model.get('step')}  {model.get('current') or ''}")
    cur = data.get("current")
    if cur:
        loss = "" if cur.get("loss") is None else f", loss {cur['loss']:.4f}"
        click.echo(f"training: #{cur['id']} {cur['name']} (attempt {cur['attempt']}) step "
                   f"{cur.get('file_step')}/{cur.get('file_steps') or '?'}{loss}")
    if data.get("interrupted"):
        i = data["interrupted"]
        click.echo(f"interrupted: #{i['id']} {i['name']} (resumes at the next start)")
    q = data.get("queue") or {}
    by = ", ".join(f"{k} {v}" for k, v in (q.get("by_priority") or {}).items() if v)
    click.echo(f"queue: {q.get('total', 0)} file(s)" + (f" ({by})" if by else ""))
    for r in q.get("next", [])[:5]:
        click.echo(f"  #{r['id']} {r['name']} [{r['priority']}]")
    counts = data.get("counts") or {}
    click.echo("files: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for r in (data.get("last") or [])[:5]:
        extra = f" {r['steps']} steps" if r.get("steps") else f" {r.get('error') or ''}"
        click.echo(f"  #{r['id']} {r['name']}: {r['state']}{extra}")
    disk = data.get("disk")
    if disk:
        click.echo(f"disk: {disk.get('free_gb')} GB free (gate {disk.get('gate')} at "
                   f"{disk.get('min_free_gb')} GB), managed {disk.get('managed_gb')} GB")


def _control(cmd: str, home: str, arg: str | None = None) -> None:
    from trainer_core.daemon.control import send

    click.echo(send(_home(home), cmd, arg))


@daemon_group.command("pause")
@home_option
def pause(home: str) -> None:
    """Pause at the next step boundary (a checkpoint is saved)."""
    _control("pause", home)


@daemon_group.command("resume")
@home_option
def resume(home: str) -> None:
    """Resume after a pause."""
    _control("resume", home)


@daemon_group.command("stop")
@home_option
@click.option("--no-wait", is_flag=True, help="Return once the daemon has the command.")
def stop(home: str, no_wait: bool) -> None:
    """Stop gracefully: checkpoint at the next step boundary and exit (waits for the exit)."""
    import time

    from trainer_core.daemon.control import send
    from trainer_core.daemon.home import daemon_running

    h = _home(home)
    result = send(h, "stop")
    click.echo(result)
    if no_wait or result == "no daemon is running":
        return
    deadline = time.time() + 300
    while daemon_running(h) and time.time() < deadline:
        time.sleep(0.2)
    click.echo("daemon stopped" if not daemon_running(h) else "still stopping after 300 s")


@daemon_group.command("skip")
@home_option
@click.argument("file", required=False)
def skip(home: str, file: str | None) -> None:
    """Skip the file in training (or the queued FILE): it goes to skipped/, the model is
    rolled back to before it; `trainer daemon retry` queues it again."""
    _control("skip", home, file)


@daemon_group.command("retry")
@home_option
@click.argument("file")
@click.option("--force", is_flag=True, help="Also a completed file (trains it again).")
def retry(home: str, file: str, force: bool) -> None:
    """Queue a failed or skipped FILE again (#id, stored name or original name)."""
    _control("retry", home, ("force:" if force else "") + file)


@daemon_group.command("history")
@home_option
@click.option("-n", "limit", type=int, default=20, show_default=True,
              help="Last N attempts (0: all).")
@click.option("--json", "as_json", is_flag=True)
def history(home: str, limit: int, as_json: bool) -> None:
    """Every attempt: file, outcome, model steps before/after, tokens, losses, error."""
    from trainer_core.daemon.control import history as get_history

    rows = get_history(_home(home), limit or None)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        when = dt.datetime.fromtimestamp(r["finished_at"]).strftime("%Y-%m-%d %H:%M:%S") \
            if r["finished_at"] else "-"
        what = (f"steps {r['step_before']}->{r['step_after']}, {r['tokens']} tokens"
                if r["outcome"] == "completed" else (r["error"] or ""))
        click.echo(f"{when}  #{r['file_id']} {r['name']}  attempt {r['attempt']}  "
                   f"{r['outcome']}  {what}")
