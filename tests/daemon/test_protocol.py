"""The worker protocol's typed messages: every message reads back as written, a malformed one
is logged rather than lost, and the daemon has a handler for every event the worker sends."""

from __future__ import annotations

import attrs
import pytest

from trainer_core.daemon import protocol
from trainer_core.daemon.service import Daemon


def _sample(cls):
    values = {int: 3, "int": 3, "int | None": 4, "float": 0.5, "float | None": 0.25,
              "str": "x", "str | None": "y", "bool": True}
    return cls(**{a.name: values[a.type] for a in attrs.fields(cls)})


@pytest.mark.parametrize("cls", [*protocol.COMMANDS.values(), *protocol.EVENTS.values()])
def test_every_message_reads_back_as_written(cls):
    msg = _sample(cls)
    line = protocol.encode(msg)
    assert line.endswith("\n") and line.count("\n") == 1
    decode = protocol.decode_command if cls in protocol.COMMANDS.values() else protocol.decode_event
    assert decode(line) == msg
    other = protocol.decode_event if decode is protocol.decode_command else protocol.decode_command
    assert other(line) is None  # a command is never taken for an event, nor the reverse


def test_a_line_that_is_no_message_is_dropped_and_a_broken_message_is_logged():
    assert protocol.decode_event("Some library printed this\n") is None
    assert protocol.decode_event("[1, 2]\n") is None
    broken = protocol.decode_event('{"event": "progress", "file_id": 1}\n')
    assert isinstance(broken, protocol.Log) and "progress" in broken.message
    unknown = protocol.decode_event('{"event": "teleported"}\n')
    assert isinstance(unknown, protocol.Log) and "teleported" in unknown.message
    assert protocol.decode_command('{"cmd": "dance"}\n') is None


def test_the_daemon_handles_every_event_but_hello():
    assert set(Daemon.EVENT_HANDLERS) == set(protocol.EVENTS.values()) - {protocol.Hello}
    names = {m.NAME for m in (*protocol.COMMANDS.values(), *protocol.EVENTS.values())}
    assert len(names) == len(protocol.COMMANDS) + len(protocol.EVENTS)  # one meaning a name
