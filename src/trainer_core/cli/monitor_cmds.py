"""``trainer plot``, ``trainer watch`` and ``trainer dashboard``: looking at runs (and daemon
homes) from their files."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from trainer_core.errors import UserError

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=_DIR)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="SVG to write (default: RUN_DIR/loss.svg for one run, ./runs.svg for more).")
@click.option("--title", default="", help="Title above the charts.")
def plot(run_dirs: tuple[Path, ...], output: Path | None, title: str) -> None:
    """Plot train/eval loss, lr and tokens/s of one or more runs (overlaid) as SVG."""
    from trainer_core.monitor.plot import plot_runs

    out = output or (run_dirs[0] / "loss.svg" if len(run_dirs) == 1 else Path("runs.svg"))
    click.echo(str(plot_runs(list(run_dirs), out, title)))


@click.command()
@click.argument("directory", required=False, default=".", type=_DIR)
@click.option("--interval", type=float, default=2.0, show_default=True,
              help="Seconds between redraws.")
@click.option("--once", is_flag=True, help="Print the view once and exit.")
@click.option("--follow", is_flag=True, help="Keep watching after the runs end.")
@click.option("--ascii", "ascii_only", is_flag=True, default=None,
              help="ASCII only (default: when the terminal is not UTF-8).")
def watch(directory: Path, interval: float, once: bool, follow: bool,
          ascii_only: bool | None) -> None:
    """Live terminal view of a run, or of the runs under DIRECTORY (default: .).

    Progress, recent losses, alerts and the latest previews, read from status.json,
    metrics.jsonl and previews.jsonl: works over SSH and on finished runs.
    """
    from trainer_core.monitor.watch import watch as watch_loop

    try:
        watch_loop(directory, interval, once, follow, ascii_only=ascii_only)
    except KeyboardInterrupt:
        pass


@click.command()
@click.argument("directory", required=False, default=".", type=_DIR)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes your runs to the network; "
                   "control actions then need the printed token.")
@click.option("--port", type=int, default=8080, show_default=True, help="0: any free port.")
def dashboard(directory: Path, host: str, port: int) -> None:
    """Local web dashboard of the runs under DIRECTORY (default: .): live charts, alerts,
    previews; of a daemon home: its queue, history, file in training and pause/resume/skip.
    Serves nothing outside DIRECTORY; needs no internet."""
    from trainer_core.daemon.dashboard import DaemonView, is_daemon_home
    from trainer_core.monitor.dashboard.server import is_loopback, make_server, stop

    # The monitor package sits below the daemon in the layering: the daemon's view is
    # composed here, as one more entry in the server's views.
    daemon = is_daemon_home(directory)
    views = {"daemon": DaemonView(directory)} if daemon else None
    what = "dashboard of daemon home" if daemon else "dashboard of"
    try:
        server, board = make_server(directory, host, port, views=views)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_address[1]}/"
    if is_loopback(host):
        click.echo(f"{what} {board.root} at {url} (Ctrl-C to stop)")
    else:
        click.echo(f"{what} {board.root} at {url}?token={board.token} (Ctrl-C to stop)")
        click.echo("warning: bound beyond loopback: anyone who can reach this address sees "
                   "your " + ("daemon" if daemon else "runs") + "; control actions need the "
                   "token above", err=True)
    # Serve from a thread; the main thread only waits for Ctrl-C or SIGTERM, so a signal never
    # lands in the middle of a request and shutdown is always clean.
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    threading.Thread(target=server.serve_forever, name="dashboard", daemon=True).start()
    try:
        while not done.wait(0.5):
            pass
    finally:
        stop(server, board)
