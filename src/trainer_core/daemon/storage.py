"""What the daemon keeps on disk: the published model, snapshots, retention, the disk gate.

Publishing: the weights and config of a checkpoint plus the tokenizer are hard-linked (no copy)
into ``models/.tmp-step-N``, renamed to ``models/step-N``, and the ``current`` symlink is
swapped with one ``rename``: a consumer that opens ``current/`` at any moment sees a complete
model, old or new. The previous published model is kept one more round for readers that
resolved the link just before the swap.

Retention works on the directories the daemon writes (``checkpoints/``, ``snapshots/``,
``models/``) and never deletes the checkpoint the current model came from, the checkpoint an
interrupted file resumes from, nor the current published model.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainer_core.daemon.home import Home

STATE_FILE = "trainer_state.json"  # as train/checkpoint.py writes it (that module imports torch)
#: Files of a checkpoint that are training state, not the model.
TRAINING_ONLY = {"training_state.pt", STATE_FILE}
GB = 1024**3


def step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def checkpoints(home: Home) -> list[Path]:
    """Complete checkpoints, oldest (lowest step) first -- by number, never by name."""
    if not home.checkpoints.is_dir():
        return []
    found = [p for p in home.checkpoints.iterdir()
             if p.name.startswith("step-") and (p / STATE_FILE).exists()]
    return sorted(found, key=step_of)


def checkpoint_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def _link_tree(src_files: Iterable[Path], dest: Path) -> None:
    dest.mkdir(parents=True)
    for f in src_files:
        try:
            os.link(f, dest / f.name)
        except OSError:  # another file system, or no hard links: copy
            shutil.copy2(f, dest / f.name)


def publish(home: Home, checkpoint: Path) -> Path:
    """Make ``checkpoint``'s model the current model (idempotent); returns models/step-N."""
    final = home.models / f"step-{step_of(checkpoint):06d}"
    if not (final / "config.json").exists():
        tmp = home.models / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        files = [f for f in checkpoint.iterdir() if f.is_file() and f.name not in TRAINING_ONLY]
        if home.tokenizer.is_dir():
            files += [f for f in home.tokenizer.iterdir() if f.is_file()]
        _link_tree(files, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    link_tmp = home.root / ".current.tmp"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(Path("models") / final.name)
    os.replace(link_tmp, home.current)
    return final


def current_model(home: Home) -> Path | None:
    if not home.current.is_symlink():
        return None
    return (home.root / os.readlink(home.current)).resolve()


# --------------------------------------------------------------------------- snapshots


def snapshot_due(now: dt.datetime, snapshot_time: str | None, last_day: str | None) -> bool:
    """Once a day, at or after ``snapshot_time`` (local), unless today's snapshot exists."""
    if snapshot_time is None:
        return False
    hh, mm = (int(x) for x in snapshot_time.split(":"))
    return now.time() >= dt.time(hh, mm) and last_day != now.date().isoformat()


def take_snapshot(home: Home, day: str) -> Path | None:
    """Hard-link the current model into ``snapshots/<day>/`` (atomic rename into place)."""
    src = current_model(home)
    if src is None or not src.is_dir():
        return None
    final = home.snapshots / day
    if final.exists():
        return final
    tmp = home.snapshots / f".tmp-{day}"
    shutil.rmtree(tmp, ignore_errors=True)
    _link_tree([f for f in src.iterdir() if f.is_file()], tmp)
    (tmp / "SNAPSHOT").write_text(json.dumps({"model": src.name, "taken_at": time.time()}),
                                  encoding="utf-8")
    os.replace(tmp, final)
    return final


def snapshots(home: Home) -> list[Path]:
    """Snapshot directories, oldest first (their names are ISO dates)."""
    if not home.snapshots.is_dir():
        return []
    return sorted(p for p in home.snapshots.iterdir() if p.is_dir() and not p.name.startswith("."))


def snapshot_time_of(path: Path) -> float:
    marker = path / "SNAPSHOT"
    try:
        return float(json.loads(marker.read_text(encoding="utf-8"))["taken_at"])
    except (OSError, ValueError, KeyError):
        return path.stat().st_mtime


# --------------------------------------------------------------------------- sizes and disk


def used_bytes(paths: Iterable[Path]) -> int:
    """Bytes on disk under ``paths``, each hard-linked file counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in paths:
        if not root.exists():
            continue
        for dirpath, _, names in os.walk(root):
            for n in names:
                try:
                    st = os.lstat(os.path.join(dirpath, n))
                except FileNotFoundError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    total += st.st_size
    return total


def managed_bytes(home: Home) -> int:
    return used_bytes([home.checkpoints, home.snapshots, home.models])


def free_bytes(home: Home) -> int:
    return shutil.disk_usage(home.root).free


def disk_gate(home: Home, min_free_gb: float) -> dict[str, Any]:
    free = free_bytes(home)
    return {"free_gb": round(free / GB, 3), "min_free_gb": min_free_gb,
            "gate": "ok" if free >= min_free_gb * GB else "blocked"}


# --------------------------------------------------------------------------- retention


def remove_tree(path: Path) -> None:
    """Delete a checkpoint, model or snapshot so that a kill midway never leaves something
    that still looks complete: its marker file goes first."""
    for marker in (STATE_FILE, "config.json", "SNAPSHOT"):
        (path / marker).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def remove_incomplete(home: Home) -> list[Path]:
    """Leftovers of a kill: temporary directories and half-deleted ones (no marker file)."""
    gone = []
    for root, marker in ((home.checkpoints, STATE_FILE), (home.models, "config.json"),
                         (home.snapshots, "SNAPSHOT")):
        if not root.is_dir():
            continue
        for p in root.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-") or not (p / marker).exists()):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def apply_retention(home: Home, keep_checkpoints: int, snapshot_max_age_h: float,
                    max_total_gb: float | None, protected: set[Path],
                    now: float | None = None) -> list[Path]:
    """Delete what the policy says may go; returns what was deleted, in order.

    1. checkpoints beyond the newest ``keep_checkpoints`` (protected ones never count as
       deletable); 2. snapshots older than ``snapshot_max_age_h``; 3. published models other
       than the current and the one before; 4. while the total of checkpoints/, snapshots/ and
       models/ exceeds ``max_total_gb``: the oldest snapshot, else the oldest unprotected
       checkpoint, else the oldest unprotected published model.
    """
    now = time.time() if now is None else now
    keep = {p.resolve() for p in protected}
    current = current_model(home)
    if current is not None:
        keep.add(current)
    deleted: list[Path] = []

    def drop(p: Path) -> None:
        remove_tree(p)
        deleted.append(p)

    ckpts = checkpoints(home)
    for p in ckpts[:-keep_checkpoints] if len(ckpts) > keep_checkpoints else []:
        if p.resolve() not in keep:
            drop(p)
    for p in snapshots(home):
        if now - snapshot_time_of(p) > snapshot_max_age_h * 3600:
            drop(p)
    models = sorted((p for p in home.models.iterdir() if p.name.startswith("step-")),
                    key=step_of) if home.models.is_dir() else []
    for p in models[:-2]:
        if p.resolve() not in keep:
            drop(p)
    if max_total_gb is not None:
        budget = max_total_gb * GB
        while managed_bytes(home) > budget:
            candidates = (snapshots(home)
                          + [p for p in checkpoints(home) if p.resolve() not in keep]
                          + sorted((p for p in home.models.iterdir()
                                    if p.name.startswith("step-") and p.resolve() not in keep),
                                   key=step_of))
            if not candidates:
                break  # only protected data left: the budget cannot be met
            drop(candidates[0])
    return deleted
