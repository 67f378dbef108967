"""Errors shown to users as one line (exit code 2) instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is wrong: bad config, bad data, unknown profile.

    The CLI prints ``str(error)`` on one line and exits with code 2 (a traceback only with
    ``--debug``). Messages name the file, line and field where one is known.
    """

    exit_code = 2


class ConfigError(UserError):
    """A configuration value is invalid; the message starts with its dotted path."""


class DataError(UserError):
    """Training data is invalid; the message lists problems as ``file:line: field: why``."""
