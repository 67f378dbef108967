"""Small file helpers every layer may use: atomic JSON writes and JSONL appends.

Atomic means temp file + rename in the same directory, so a reader (a dashboard, the daemon,
``trainer watch``) never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# The files of a run directory, named once: train/ writes them; monitor/, generate/ and the
# daemon read them (those sit below train/ in the layering, so the names live here).
RUN_MANIFEST = "run.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
PREVIEWS_FILE = "previews.jsonl"
CONFIG_FILE = "trainer_config.json"
#: A run directory's lock (``flock``), held by the training process for its whole life.
RUN_LOCK_FILE = ".trainer-run.lock"
#: A daemon home keeps its logs and its per-step metrics.jsonl here (``trainer watch`` reads it).
DAEMON_LOG_DIR = "logs"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically; on failure (disk full) no temp file stays."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (datasets can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """The trainer's cache folder: ``$TRAINER_CACHE`` if set, else ``~/.cache/trainer``."""
    env = os.environ.get("TRAINER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trainer"


def missing_model_hint(given: str) -> str:
    """What to say when a model or tokenizer path does not exist: trainer never downloads, so a
    hub name (``Qwen/Qwen3-0.6B``) gets the command that makes a local copy."""
    name = given.strip().rstrip("/")
    looks_like_hub = (name.count("/") == 1 and not name.startswith((".", "~", "/"))
                      and all(part for part in name.split("/")))
    if not looks_like_hub:
        return "models are loaded from local directories only; nothing is downloaded"
    folder = "models/" + name.rsplit("/", 1)[-1]
    return (f"{name!r} looks like a Hugging Face hub name, and nothing is downloaded: make a "
            f"local copy once (`huggingface-cli download {name} --local-dir {folder}`) and "
            f"pass --model {folder}")


def run_lock_holder(output_dir: Path) -> int | None:
    """The pid of the live process holding ``output_dir``'s run lock (0 when unknown), or
    ``None`` when no process holds it. Never creates anything."""
    import fcntl

    path = Path(output_dir) / RUN_LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return int(path.read_text(encoding="utf-8").strip() or 0)
        except (OSError, ValueError):
            return 0
    finally:
        os.close(fd)  # closing also drops the probe's shared lock
    return None
