"""``trainer serve``."""

from __future__ import annotations

import click

from trainer_core.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@click.command()
@click.argument("target", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@click.option("--api-key", envvar="TRAINER_SERVE_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on /v1/ (env TRAINER_SERVE_API_KEY).")
@click.option("--name", default=None,
              help="The model id clients ask for (default: the folder's name).")
@click.option("--queue-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting for a generation; more are answered 429.")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests generated together at most.")
@click.option("--max-tokens-cap", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Largest max_tokens a request may ask for.")
def serve(target: str, host: str, port: int, api_key: str | None, name: str | None,
          queue_size: int, max_batch: int, max_tokens_cap: int) -> None:
    """Serve TARGET over an OpenAI-compatible chat API: a run directory, one of its
    checkpoints, any local HF model directory, or a daemon home (its live model, followed)."""
    if host not in LOOPBACK and not host.startswith("127.") and not api_key:
        raise UserError(f"--host {host}: binding beyond this machine needs --api-key (or "
                        f"TRAINER_SERVE_API_KEY)")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("trainer serve needs Starlette and uvicorn: pip install "
                        "'trainer-core[serve]'") from None
    from trainer_core.serve.app import serve as run_server

    run_server(target, host, port, api_key, queue_size, max_batch, max_tokens_cap, name)
