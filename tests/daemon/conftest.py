"""Helpers for the daemon tests: a home on the micro model, files, a daemon subprocess.

Tests get this module as the ``du`` fixture (pytest runs with ``--import-mode=importlib``, so
test modules cannot import a helper module by name).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trainer_core.config import resolve, to_dict


@pytest.fixture(scope="session")
def du():
    return sys.modules[__name__]


PEAK_LR = 1e-3
WARMUP = 3


def make_home(root: Path, model_dir: Path, **overrides: Any) -> Path:
    """A daemon home whose config.json trains the micro model: 2 rows per step."""
    settings = {
        "model.path": str(model_dir),
        "hyperparams.batch_size": 2,
        "hyperparams.max_length": 512,
        "hyperparams.learning_rate": PEAK_LR,
        "hyperparams.warmup_steps": WARMUP,
        "monitoring.num_preview_samples": 0,
        "environment.device": "cpu",
        "daemon.poll_interval_s": 0.2,
        "daemon.settle_s": 0.0,
        "daemon.max_attempts": 2,
        "daemon.snapshot_time": None,
        "daemon.min_free_gb": 0.0,
        "daemon.status_interval_s": 0.2,
        **overrides,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(to_dict(resolve(cli=settings).config)),
                                      encoding="utf-8")
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def env(fault: str | None = None) -> dict[str, str]:
    out = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    out["PYTHONPATH"] = os.pathsep.join([src, out.get("PYTHONPATH", "")])
    out["HF_HUB_OFFLINE"] = "1"
    out["OMP_NUM_THREADS"] = "1"  # the same threads in every run: bit-identical results
    if fault:
        out["TRAINER_DAEMON_FAULT"] = fault
    else:
        out.pop("TRAINER_DAEMON_FAULT", None)
    return out


def start(home: Path, fault: str | None = None) -> subprocess.Popen:
    """``trainer daemon start --home HOME`` in its own process group (output in HOME/test.out)."""
    out = open(home / "test.out", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "trainer_core", "daemon", "start", "--home",
                             str(home)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            env=env(fault), start_new_session=True)
    out.close()
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None,
             home: Path | None = None) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited ({proc.returncode}) waiting for {what}:\n"
                                 + tail(home))
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n" + tail(home))


def tail(home: Path | None) -> str:
    if home is None:
        return ""
    parts = []
    for name in ("test.out", "logs/worker.log"):
        p = home / name
        if p.exists():
            parts.append(f"--- {name}\n" + "\n".join(
                p.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]))
    return "\n".join(parts)


def rows(home: Path, sql: str = "SELECT * FROM files ORDER BY id", args: tuple = ()
         ) -> list[dict]:
    db = sqlite3.connect(f"file:{home / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(sql, args)]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def all_final(home: Path) -> bool:
    found = rows(home)
    return bool(found) and all(r["state"] in ("completed", "failed", "skipped") for r in found)


def status(home: Path) -> dict:
    try:
        return json.loads((home / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def metrics(home: Path) -> list[dict]:
    path = home / "logs" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))
