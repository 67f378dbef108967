"""The whole plugin contract of trainer.

A plugin is a Python module (or object) with functions decorated by ``trainer_core.hookimpl``
whose names match the specs below. Ship it as a distribution that declares the module in the
``trainer`` entry-point group::

    [project.entry-points.trainer]
    my_profile = "my_package.plugin"

``pip install`` it and ``trainer profiles`` lists what it registered. Set ``TRAINER_PLUGINS`` to a
comma-separated list of distribution names to load only those (an empty string loads none); the
built-in ``plain_sft`` profile is always there. Implement any subset of the hooks; arguments may be
omitted from an implementation's signature (pluggy passes only those named).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("trainer")


@hookspec
def register_profiles(register: Callable[[type], None]) -> None:
    """Register data profiles by calling ``register(ProfileClass)`` once per profile.

    ``ProfileClass`` is a subclass of ``trainer_core.Profile`` with class attributes ``name``,
    ``version``, ``description`` and ``Options`` (an attrs class). The core builds instances from
    the config's ``profile.options``. Two plugins registering the same ``name`` is an error that
    names both. An exception raised here marks this plugin as broken (``trainer plugins`` shows
    the error) without affecting other plugins.
    """


@hookspec
def logits_processors(profile: Any, tokenizer: Any, config: Any) -> list[Any] | None:
    """Return ``transformers.LogitsProcessor`` objects to use when generating with ``profile``.

    Called for every generation (training previews, ``trainer generate``) with the active
    ``Profile`` instance, the tokenizer and the resolved ``TrainerConfig``. Return ``None`` or an
    empty list when the profile is not yours. A profile's own processors (``Profile.
    logits_processors``) arrive through this hook too, via the core's built-in plugin, so the
    results of all plugins are concatenated in registration order. Processors must keep
    per-row state for batched, left-padded generation and must not leak state between calls:
    return fresh objects each time. They never affect the training loss.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``trainer`` click group: ``@cli.command()`` or ``cli.add_command(c)``.

    Keep module-level imports light: the CLI is built on every ``trainer`` invocation.
    """


@hookspec
def run_listeners(config: Any, output_dir: Any) -> list[Any] | None:
    """Return objects that watch a training run (experiment trackers, notifiers, exporters).

    Called once per ``trainer run`` (on the process that writes the run's files, rank 0 under
    several processes) with the resolved ``TrainerConfig`` and the run's output directory
    (a ``pathlib.Path``). Return ``None`` or a list of ``trainer_core.monitor.events.RunListener``
    subclasses' instances: their ``on_start``, ``on_step_end``, ``on_evaluation``, ``on_preview``,
    ``on_checkpoint``, ``on_alert`` and ``on_end`` methods receive the run's events in order,
    then ``close()``. An experiment tracker is such a listener, returned when its name is in
    ``config.environment.report_to`` (declare the name with ``trackers``).
    Listeners run on the training thread after the built-in ones: keep them cheap.
    """


@hookspec
def trackers() -> list[str] | None:
    """Return the tracker names this plugin accepts in ``environment.report_to``.

    A tracker is a ``run_listeners`` implementation that returns a listener when its name is in
    ``config.environment.report_to``. Declaring the names here lets ``trainer run`` reject a
    misspelt or uninstalled tracker before any work, listing the ones available. If your tracker
    needs an optional package, import it in the listener's constructor and raise
    ``trainer_core.UserError`` naming what to install: that constructor runs before the model
    is loaded.
    """
