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


class RunFailure(UserError):
    """A run that started failed or was interrupted: one line on stderr, exit code 1.

    Raised after the run's final state (``failed`` or ``interrupted``) has been written to
    ``status.json`` and ``run.json``.
    """

    exit_code = 1


class PluginError(UserError):
    """A plugin hook raised; the message names the plugin and the hook."""

    def __init__(self, plugin: str, hook: str, exc: BaseException):
        super().__init__(f"plugin {plugin!r}: {hook} failed: {type(exc).__name__}: {exc}")
        self.plugin = plugin
        self.hook = hook
