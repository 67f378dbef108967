"""The worker protocol: one JSON object a line between the daemon and its training worker,
read into typed messages.

The daemon writes commands on the worker's stdin, ``{"cmd": NAME, ...}``: :class:`InitCommand`,
:class:`TrainCommand`, :class:`PauseCommand`, :class:`SkipCommand`, :class:`StopCommand`. The
worker (rank 0 under torchrun) answers on its own copy of stdout, ``{"event": NAME, ...}``: the
classes in :data:`EVENTS`. :class:`Exit` is never sent: the daemon's reader thread makes it
when the worker process ends. A message's fields are its JSON keys; :func:`encode` and the
two decoders are the only places that touch JSON.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import attrs

# --------------------------------------------------------------------------- daemon -> worker


@attrs.define(frozen=True)
class InitCommand:
    """Write the daemon's first checkpoint (step 0: the base model, a fresh optimizer)."""

    NAME: ClassVar[str] = "init"


@attrs.define(frozen=True)
class TrainCommand:
    """Train one file, starting from checkpoint ``start_from``."""

    NAME: ClassVar[str] = "train"
    file_id: int
    attempt: int
    name: str
    path: str
    start_from: str
    seed: int
    #: where the worker leaves the invalid rows it found
    problems_path: str


@attrs.define(frozen=True)
class PauseCommand:
    """Checkpoint and stop training at the next step boundary; stay loaded."""

    NAME: ClassVar[str] = "pause"


@attrs.define(frozen=True)
class SkipCommand:
    """Drop the file in training at the next step boundary (the model rolls back)."""

    NAME: ClassVar[str] = "skip"


@attrs.define(frozen=True)
class StopCommand:
    """Checkpoint at the next step boundary and exit."""

    NAME: ClassVar[str] = "stop"


COMMANDS: dict[str, type] = {c.NAME: c for c in (InitCommand, TrainCommand, PauseCommand,
                                                  SkipCommand, StopCommand)}

# --------------------------------------------------------------------------- worker -> daemon


@attrs.define(frozen=True)
class Hello:
    """The process started (before torch is imported)."""

    NAME: ClassVar[str] = "hello"
    pid: int


@attrs.define(frozen=True)
class Loaded:
    """Model, optimizer and tokenizer are in memory; commands are read from now on."""

    NAME: ClassVar[str] = "loaded"
    step: int


@attrs.define(frozen=True)
class Ready:
    """The answer to ``init``: the base model's checkpoint."""

    NAME: ClassVar[str] = "ready"
    checkpoint: str
    step: int


@attrs.define(frozen=True)
class Started:
    """A file is validated and preprocessed; its first step is next."""

    NAME: ClassVar[str] = "started"
    file_id: int
    file_step: int
    file_steps: int
    step: int
    resumed: bool
    time: float


@attrs.define(frozen=True)
class Progress:
    """One optimizer step of the file done."""

    NAME: ClassVar[str] = "progress"
    file_id: int
    file_step: int
    file_steps: int
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    time: float


@attrs.define(frozen=True)
class Checkpoint:
    """A checkpoint inside the file (``daemon.save_steps``)."""

    NAME: ClassVar[str] = "checkpoint"
    file_id: int
    checkpoint: str
    step: int
    file_step: int


@attrs.define(frozen=True)
class Done:
    """The file is trained and its final checkpoint written."""

    NAME: ClassVar[str] = "done"
    checkpoint: str
    file_id: int
    attempt: int
    file_step: int
    file_steps: int
    step_before: int
    tokens: int
    loss_start: float | None
    loss_end: float | None
    rows: int
    invalid_rows: int
    complete: bool
    step: int
    time: float


@attrs.define(frozen=True)
class Failed:
    """The file failed (``exiting``: the worker is going away too, a rank died;
    ``data_error``: the file's own data, another attempt would fail the same way;
    ``disk_full``: not the file's failure, it goes back in line)."""

    NAME: ClassVar[str] = "failed"
    file_id: int
    error: str
    rows: int | None = None
    invalid_rows: int | None = None
    exiting: bool = False
    data_error: bool = False
    disk_full: bool = False


@attrs.define(frozen=True)
class Skipped:
    """The answer to ``skip``."""

    NAME: ClassVar[str] = "skipped"
    file_id: int


@attrs.define(frozen=True)
class Paused:
    """The answer to ``pause``: where training stopped."""

    NAME: ClassVar[str] = "paused"
    file_id: int
    checkpoint: str
    step: int
    file_step: int


@attrs.define(frozen=True)
class Stopped:
    """The answer to ``stop`` (``file_id`` None: nothing was in training)."""

    NAME: ClassVar[str] = "stopped"
    file_id: int | None
    checkpoint: str | None = None
    step: int | None = None
    file_step: int | None = None


@attrs.define(frozen=True)
class Fatal:
    """The worker cannot run at all (a config or model error); it exits with code 2."""

    NAME: ClassVar[str] = "fatal"
    error: str


@attrs.define(frozen=True)
class Log:
    """A line for the daemon's log."""

    NAME: ClassVar[str] = "log"
    message: str


@attrs.define(frozen=True)
class Exit:
    """The worker process ended (made by the daemon's reader thread, never sent)."""

    NAME: ClassVar[str] = "exit"
    code: int


EVENTS: dict[str, type] = {e.NAME: e for e in (Hello, Loaded, Ready, Started, Progress,
                                                Checkpoint, Done, Failed, Skipped, Paused,
                                                Stopped, Fatal, Log, Exit)}


# --------------------------------------------------------------------------- JSON


def encode(msg: Any) -> str:
    """One protocol line (with its newline) for a command or an event."""
    key = "cmd" if COMMANDS.get(msg.NAME) is type(msg) else "event"
    return json.dumps({key: msg.NAME, **attrs.asdict(msg)}, default=str) + "\n"


def _decode(line: str, key: str, table: dict[str, type]) -> Any:
    """``(message, None)``, or ``(None, why)`` for a JSON object that is not a valid message,
    or ``(None, None)`` for a line that is no JSON object at all."""
    try:
        data = json.loads(line)
    except ValueError:
        return None, None
    if not isinstance(data, dict) or key not in data:
        return None, None
    name = data.pop(key)
    cls = table.get(name)
    if cls is None:
        return None, f"unknown {key} {name!r}"
    try:
        return cls(**data), None
    except TypeError as exc:
        return None, f"{key} {name!r}: {exc}"


def decode_event(line: str) -> Any:
    """The event on a line from the worker; a line that is no message at all (a stray print)
    gives None, and a message that does not read gives a :class:`Log` saying why (the daemon
    writes it to its log rather than lose it silently)."""
    msg, why = _decode(line, "event", EVENTS)
    if why is not None:
        return Log(f"unreadable worker message ({why}): {line.strip()[:300]}")
    return msg


def decode_command(line: str) -> Any:
    """The command on a line from the daemon, or None if it is not one."""
    return _decode(line, "cmd", COMMANDS)[0]
