"""The run's output directory: ownership, state and resume targets (what the run records
about itself, run.json and the resume facts, is :mod:`trainer_core.train.manifest`).

What trainer guarantees about an output directory (README, "What trainer guarantees"):

* A run holds an exclusive OS lock (:class:`RunDirLock`, ``fcntl.flock`` on
  ``.trainer-run.lock``) for its whole life; the kernel drops it when the process dies, so a
  killed run never leaves a stale lock. A second run into a locked directory is refused naming
  the holder's pid.
* A directory holding a run (completed, failed, interrupted, killed) or anything else is never
  reused silently: ``--resume``, ``--overwrite`` or another ``--output-dir``.

:func:`inspect_run_dir` (what a directory holds), :func:`find_resumable_runs`,
:func:`locate_output` (the read-only decision), :func:`claim_output` (lock and prepare) and
:func:`record_outcome` are what the recipe calls; the daemon keeps its own home
(:mod:`trainer_core.daemon.home`) and uses none of them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from trainer_core.config import TrainerConfig
from trainer_core.errors import RunFailure, UserError
from trainer_core.files import (  # noqa: F401  (the file names are re-exported for callers)
    CONFIG_FILE,
    METRICS_FILE,
    PREVIEWS_FILE,
    RUN_LOCK_FILE,
    RUN_MANIFEST,
    STATUS_FILE,
    run_lock_holder,
    write_json_atomic,
)

RUNS_ROOT = Path("runs")
LATEST_LINK = "latest"
#: Files whose presence makes a directory a run directory (the model lock file included).
RUN_MARKERS = (RUN_MANIFEST, STATUS_FILE, CONFIG_FILE, "trainer.lock.json", "checkpoints",
               RUN_LOCK_FILE)
FINISHED_STATES = ("completed", "failed", "interrupted")


# --------------------------------------------------------------------------- the lock


class DirectoryInUse(UserError):
    """Another live process holds the output directory's lock."""

    def __init__(self, path: Path, pid: int | None):
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"{path} is in use by another trainer run ({who}); wait for it to end, "
                         "or choose another --output-dir")
        self.pid = pid


class RunDirLock:
    """An exclusive lock on an output directory for the life of a run.

    ``fcntl.flock`` on ``<dir>/.trainer-run.lock``, which also records the holder's pid. The
    lock belongs to the open file, so the kernel releases it when the process exits, however
    it exits (SIGKILL included): there is never a stale lock to clean up. Usable as a context
    manager; :meth:`acquire` raises :class:`DirectoryInUse` naming the holder's pid, or
    :class:`~trainer_core.errors.RunFailure` when the lock cannot be written (disk full).
    """

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / RUN_LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        import fcntl

        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _io_failure(f"cannot create {self.path}", exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirectoryInUse(self.output_dir, _read_pid(self.path)) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)  # drops the lock
            raise _io_failure(f"cannot write the run lock {self.path}", exc) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _io_failure(what: str, exc: OSError) -> UserError:
    # Disk full and I/O errors are run failures (exit 1); permissions are the user's (exit 2).
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"{what}: {exc.strerror}")
    return RunFailure(f"{what}: {exc.strerror or exc}")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").strip() or 0) or None
    except (OSError, ValueError):
        return None


#: The pid of the live process holding a run directory's lock (in files.py: the dashboard,
#: below this layer, checks it too before signalling a run).
lock_holder = run_lock_holder


# --------------------------------------------------------------------------- what a directory holds


@attrs.frozen
class RunDirInfo:
    """What an output directory holds.

    ``kind``: ``missing``, ``empty``, ``locked`` (a live run holds it: ``holder_pid``),
    ``run`` (a run directory) or ``foreign`` (other files). ``state`` (run directories): the
    recorded final state (completed, failed, interrupted), ``stopped`` when the record says
    running but no process holds the lock (killed), ``None`` when nothing was recorded.
    ``checkpoints``: the complete checkpoints, oldest first.
    """

    path: Path
    kind: str
    state: str | None = None
    checkpoints: list[Path] = attrs.field(factory=list)
    holder_pid: int | None = None
    profile: str | None = None
    started_at: float | None = None

    @property
    def completed(self) -> bool:
        return self.kind == "run" and self.state == "completed"

    @property
    def resumable(self) -> bool:
        """A run that did not complete and has a checkpoint to continue from."""
        return self.kind == "run" and not self.completed and bool(self.checkpoints)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def inspect_run_dir(path: Path, lock_held: bool = False) -> RunDirInfo:
    """Classify ``path`` without changing anything (see :class:`RunDirInfo`).

    ``lock_held``: the caller holds the directory's lock, so it is not "locked" to it.
    """
    from trainer_core.train.checkpoint import list_checkpoints

    path = Path(path)
    if not path.is_dir():
        return RunDirInfo(path, "missing")
    entries = [e.name for e in path.iterdir()]
    if not entries:
        return RunDirInfo(path, "empty")
    holder = None if lock_held else lock_holder(path)
    manifest = _read_json(path / RUN_MANIFEST)
    status = _read_json(path / STATUS_FILE)
    profile = (manifest.get("profile") or {}).get("name") if isinstance(
        manifest.get("profile"), dict) else None
    if holder is not None:
        return RunDirInfo(path, "locked", "running", holder_pid=holder, profile=profile)
    if not any(m in entries for m in RUN_MARKERS):
        return RunDirInfo(path, "foreign")
    if entries == [RUN_LOCK_FILE]:  # a run that was refused or died before writing anything
        return RunDirInfo(path, "empty")
    state = manifest.get("state") or status.get("state")
    if state not in FINISHED_STATES:
        state = "stopped" if state else None
    return RunDirInfo(path, "run", state, list_checkpoints(path), None, profile,
                      manifest.get("started_at") or status.get("started_at"))


def find_resumable_runs(profile: str, root: Path = RUNS_ROOT) -> list[RunDirInfo]:
    """Resumable runs of ``profile`` under ``root``, newest first (by newest checkpoint)."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_symlink() or not d.is_dir():
            continue
        info = inspect_run_dir(d)
        if info.resumable and (info.profile == profile or
                               (info.profile is None and d.name.startswith(f"{profile}-"))):
            found.append(info)
    return sorted(found, key=lambda i: i.checkpoints[-1].stat().st_mtime, reverse=True)


def check_output_path(path: Path) -> None:
    """One-line errors for an output path that cannot be a directory we write: a file, under a
    file, a symlink loop, or not writable."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise UserError(f"output.output_dir: {path}: a parent is a file, not a directory") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"output.output_dir: {path}: symlink loop") from None
        raise UserError(f"output.output_dir: {path}: {exc.strerror or exc}") from None
    if st is not None:
        if not os.path.isdir(path):
            raise UserError(f"output.output_dir: {path} is a file, not a directory")
        target = path
    else:
        if os.path.islink(path):  # a dangling symlink
            raise UserError(f"output.output_dir: {path} is a broken symlink")
        target = path.parent
        while not os.path.lexists(target) and target != target.parent:
            target = target.parent
        if os.path.lexists(target) and not os.path.isdir(target):
            raise UserError(f"output.output_dir: {path}: {target} is a file, not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"output.output_dir: {target} is not writable")


# --------------------------------------------------------------------------- the decision


@attrs.frozen
class OutputTarget:
    """Where a run will write and how (the decision :func:`locate_output` makes).

    ``resume_from``: an explicit checkpoint directory, or ``None`` with ``resume`` for the
    newest readable one in ``output_dir``. ``restart``: resume asked for a run that has no
    complete checkpoint (killed before its first): it starts again from step 0 in place.
    """

    output_dir: Path
    facts: dict[str, Any]
    resume: bool = False
    resume_from: Path | None = None
    restart: bool = False
    overwrite: bool = False
    default_dir: bool = False


def locate_output(cfg: TrainerConfig, model_dir: Path, dry_run: bool, unlock: bool,
                  note: Callable[[str], None] | None = None) -> OutputTarget:
    """Decide the output directory and whether the run starts fresh, resumes or overwrites.

    Read-only: checks the model against the config's locked fields and the directory's model
    lock, and refuses (``UserError``, exit 2) a locked directory, a finished or foreign one
    without ``--resume``/``--overwrite``, a completed run with ``--resume``. ``note`` receives
    informational lines (which run ``--resume`` picked).
    """
    from trainer_core.config.lock import (
        check_and_write_lock,
        check_model_against_config,
        expected_facts,
        model_facts,
    )

    out = cfg.output
    if out.overwrite and out.resume:
        raise UserError("--overwrite and --resume contradict each other; choose one")
    base_model = cfg.locked.base_model or (cfg.model.path or "trainer/tiny-qwen3-demo")
    check_model_against_config(cfg, model_facts(model_dir))
    from trainer_core.model.loading import check_weight_files

    check_weight_files(model_dir)  # before the output directory is claimed and locked to it
    facts = expected_facts(cfg, model_dir, base_model)
    explicit = Path(out.resume) if out.resume not in (None, "latest") else None
    default_dir = False
    if out.output_dir:
        output_dir = Path(out.output_dir)
    elif explicit is not None and inspect_run_dir(explicit.parent.parent).kind in ("run",
                                                                                  "locked"):
        output_dir = explicit.parent.parent  # --resume-from CKPT continues that run
    elif out.resume == "latest":
        output_dir = _newest_resumable(cfg.profile.name, note)
    else:
        output_dir, default_dir = default_output_dir(cfg.profile.name), True
    check_output_path(output_dir)
    info = inspect_run_dir(output_dir)
    if info.kind == "locked":
        raise DirectoryInUse(output_dir, info.holder_pid)
    if not out.overwrite:
        check_and_write_lock(output_dir, facts, unlock=unlock, write=False)
    target = OutputTarget(output_dir, facts, bool(out.resume), explicit, False, out.overwrite,
                          default_dir)
    if out.overwrite:
        _check_overwrite(output_dir, info, cfg)
    if out.overwrite or info.kind in ("missing", "empty"):
        if out.resume and explicit is None:
            from trainer_core.train.checkpoint import find_resume_checkpoint

            find_resume_checkpoint(output_dir, "latest")  # raises "no checkpoint in ..."
        return target
    if info.kind == "foreign":
        raise UserError(f"{output_dir} is not empty and holds no trainer run; choose another "
                        "--output-dir (--overwrite replaces only a run directory)")
    # a run directory
    if not out.resume:
        what = _describe(info)
        raise UserError(f"{output_dir} already holds {what}; pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --output-dir")
    if info.completed:
        raise UserError(f"{output_dir} holds a completed run; there is nothing to resume. Pass "
                        "--overwrite to train again there, or choose another --output-dir")
    if explicit is None and not info.checkpoints:
        if note is not None:
            note(f"{output_dir} has no complete checkpoint (the run stopped before its first); "
                 "starting again from step 0")
        return attrs.evolve(target, restart=True)
    return target


def _check_overwrite(output_dir: Path, info: RunDirInfo, cfg: TrainerConfig) -> None:
    """``--overwrite`` replaces a run directory only: never a folder of other files (a
    project folder), never one holding the data being trained on."""
    if info.kind == "foreign":
        raise UserError(f"--overwrite: {output_dir} holds files that are not a trainer run "
                        "(no run.json, status.json, checkpoints...); --overwrite replaces only "
                        "a run directory. Choose another --output-dir")
    root = output_dir.resolve()
    for field, value in (("data.dataset", cfg.data.dataset),
                         ("data.validation", cfg.data.validation)):
        if value and root in Path(value).resolve().parents:
            raise UserError(f"--overwrite: {field} {value} is inside {output_dir}, which "
                            "--overwrite would delete; choose another --output-dir")


def _describe(info: RunDirInfo) -> str:
    n = len(info.checkpoints)
    state = {"stopped": "killed", None: "unfinished"}.get(info.state, info.state) or "unfinished"
    ckpts = f"{n} checkpoint{'s' if n != 1 else ''}" if n else "no checkpoint"
    article = "an" if state[0] in "aeiou" else "a"
    return f"{article} {state} run ({ckpts})"


def _newest_resumable(profile: str, note: Callable[[str], None] | None) -> Path:
    found = find_resumable_runs(profile)
    if not found:
        others = [d for d in sorted(RUNS_ROOT.glob(f"{profile}-*")) if d.is_dir()]
        listed = "; ".join(f"{d} ({_describe(inspect_run_dir(d))})" for d in others[-5:])
        raise UserError(f"--resume: no resumable {profile} run under {RUNS_ROOT}/"
                        + (f" (found: {listed})" if listed else "")
                        + "; pass --output-dir DIR of the run to continue")
    if note is not None:
        more = (f"; other candidates: {', '.join(str(i.path) for i in found[1:4])}"
                if len(found) > 1 else "")
        note(f"--resume: continuing {found[0].path}, the newest resumable {profile} run{more}")
    return found[0].path


# --------------------------------------------------------------------------- claiming


def claim_output(target: OutputTarget, cfg: TrainerConfig, unlock: bool) -> RunDirLock:
    """Take the directory's lock, re-check the decision under it, and prepare the directory:
    clear it (``--overwrite``), remove leftover ``.tmp-*`` checkpoint directories, write the
    model lock, point ``runs/latest`` at it. Returns the held lock (release it at the end)."""
    from trainer_core.config.lock import check_and_write_lock
    from trainer_core.train.checkpoint import clean_partial

    lock = RunDirLock(target.output_dir).acquire()
    try:
        # Another run may have come and gone between the decision and the lock.
        info = inspect_run_dir(target.output_dir, lock_held=True)
        if not target.overwrite and not target.resume and info.kind not in ("missing", "empty"):
            raise UserError(f"{target.output_dir} already holds {_describe(info)}; pass "
                            "--resume, --overwrite, or choose another --output-dir")
        if target.overwrite:
            _check_overwrite(target.output_dir, info, cfg)
            for child in target.output_dir.iterdir():
                if child.name == RUN_LOCK_FILE:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        clean_partial(target.output_dir)
        if target.restart:
            truncate_logs(target.output_dir, cfg, 0)
        check_and_write_lock(target.output_dir, target.facts, unlock=unlock)
        if target.default_dir or target.output_dir.parent == RUNS_ROOT:
            update_latest(target.output_dir)
    except OSError as exc:
        lock.release()
        raise _io_failure(f"cannot prepare {target.output_dir}", exc) from None
    except BaseException:
        lock.release()
        raise
    return lock


def release_claim(output_dir: Path) -> None:
    """Undo :func:`claim_output` for a fresh directory whose run never started (bad data found
    during preprocessing): remove the lock files it wrote, and the directory if now empty.
    Call after releasing the lock."""
    from trainer_core.config.lock import LOCK_FILE

    for name in (LOCK_FILE, CONFIG_FILE, RUN_LOCK_FILE):
        (Path(output_dir) / name).unlink(missing_ok=True)
    try:
        Path(output_dir).rmdir()
    except OSError:
        pass


def update_latest(output_dir: Path) -> None:
    """Point ``<parent>/latest`` at ``output_dir`` (a relative symlink, replaced atomically)."""
    link = output_dir.parent / LATEST_LINK
    tmp = output_dir.parent / f".{LATEST_LINK}.tmp-{os.getpid()}"
    try:
        if os.path.lexists(tmp):
            tmp.unlink()
        os.symlink(output_dir.name, tmp)
        os.replace(tmp, link)
    except OSError:  # no symlinks here (some filesystems): the link is a convenience
        if os.path.lexists(tmp):
            tmp.unlink()


def truncate_logs(output_dir: Path, cfg: TrainerConfig, step: int) -> None:
    """Drop ``metrics.jsonl`` and ``previews.jsonl`` records after ``step`` (a resume redoes
    those steps; they must not appear twice)."""
    metrics = Path(cfg.output.logging_dir or output_dir) / METRICS_FILE
    for path in (metrics, Path(output_dir) / PREVIEWS_FILE):
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                kept.append(line + "\n")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def record_outcome(output_dir: Path, state: str, reason: str | None) -> None:
    """Write a final ``state`` (and ``reason``) into ``status.json`` and ``run.json``, keeping
    what they hold; for runs that end outside the event stream (a failure or signal before
    or between steps). Best effort: a full disk must not hide the original error."""
    now = time.time()
    for name in (STATUS_FILE, RUN_MANIFEST):
        path = Path(output_dir) / name
        data = _read_json(path)
        data.update(state=state, reason=reason, updated_at=now)
        if name == STATUS_FILE:
            data.setdefault("pid", os.getpid())
        try:
            write_json_atomic(path, data)
        except OSError:
            pass


def resume_hint(cfg: TrainerConfig, target: OutputTarget) -> str:
    """How to continue an interrupted run, working as printed (a default output directory is
    named, since the same command would otherwise pick a new one)."""
    extra = f" --output-dir {target.output_dir}" if target.default_dir else ""
    without = " (without --overwrite)" if cfg.output.overwrite else ""
    return f"continue with the same command{without} plus --resume{extra}"


@contextlib.contextmanager
def outcome_recorded(target: OutputTarget, lock: RunDirLock | None, hint: str
                     ) -> Iterator[list[bool]]:
    """Make every way a claimed run can end outside its event stream a recorded final state,
    and release the lock at the end.

    Yields a list the run appends ``True`` to once it starts training. Then: a signal
    (``RunInterrupted``) becomes state ``interrupted`` and ``RunFailure`` (exit 1); an
    ``OSError`` (disk full) becomes ``failed`` and ``RunFailure``; a ``UserError`` after the
    start is recorded as ``failed``; one before it leaves a resumed run's record as it was, and
    gives a fresh directory back empty (so fixing the mistake and rerunning works). An
    unexpected exception (a bug) is recorded as ``failed`` and propagates with its traceback.
    """
    from trainer_core.train.signals import RunInterrupted

    began: list[bool] = []

    def record(state: str, reason: str) -> None:
        if lock is not None:
            record_outcome(target.output_dir, state, reason)

    try:
        yield began
    except RunInterrupted as exc:
        reason = (f"interrupted by signal {exc.signum} before the run could checkpoint; "
                  + (hint if lock is not None else "nothing written"))
        record("interrupted", reason)
        raise RunFailure(reason) from None
    except RunFailure as exc:
        record("failed", str(exc))
        raise
    except UserError as exc:
        if began:
            record("failed", str(exc).splitlines()[0])
        elif lock is not None and not target.resume:
            lock.release()
            release_claim(target.output_dir)
        raise
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        reason = f"{exc.strerror or exc}{where}; the last good checkpoint is kept"
        record("failed", reason)
        raise RunFailure(reason) from exc
    except Exception as exc:
        record("failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if lock is not None:
            lock.release()


def default_output_dir(profile_name: str) -> Path:
    """``runs/<profile>-<timestamp>``, with a ``-N`` suffix when that name is taken."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RUNS_ROOT / f"{profile_name}-{stamp}"
    n = 2
    while os.path.lexists(path):
        path = RUNS_ROOT / f"{profile_name}-{stamp}-{n}"
        n += 1
    return path
