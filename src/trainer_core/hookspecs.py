"""The whole plugin contract of trainer.

A plugin is a Python module (or object) with functions decorated by ``trainer_core.hookimpl``
whose names match the specs below. Ship it as a distribution that declares the module in the
``trainer`` entry-point group::

    [project.entry-points.trainer]
    my_profile = "my_package.plugin"

``pip install`` it and ``trainer profiles`` lists what it registered. Set ``TRAINER_PLUGINS`` to a
comma-separated list of distribution names to load only those (an empty string loads none); the
built-in ``plain_sft`` profile is always there. Implement any subset of the hooks; arguments may be
omitted from an implementation's signature (pluggy passes only those named). Each hook here has
an entry in docs/plugins.md and a test named ``test_hook_<name>`` (tests/test_plugin_contract.py
fails when either is missing). ``TRAINER_TRACE_PLUGINS=1`` prints every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("trainer")


@hookspec
def register_profiles(register: Callable[[type], None]) -> None:
    """Register data profiles by calling ``register(ProfileClass)`` once per profile.

    ``ProfileClass`` subclasses ``trainer_core.Profile`` and is declared once, in its class
    statement: ``class Shout(Profile, name="shout", version="1", description="...")`` with an
    attrs ``Options`` class (see ``Profile``). ``register`` checks it against the contract: a
    violation (a name that is not a string, no version, ``Options`` not an attrs class...) marks
    this plugin as broken with the reason, shown by ``trainer plugins``; the v1 declaration
    (class attributes) works with a ``DeprecationWarning``. The core builds instances from the
    config's ``profile.options``. Two plugins registering different classes under one ``name``
    is an error that names both. An exception raised here marks this plugin as broken without
    affecting other plugins.
    """


@hookspec
def logits_processors(profile: Any, tokenizer: Any, config: Any) -> list[Any] | None:
    """Return ``transformers.LogitsProcessor`` objects to add to generation with *any* profile.

    For processors that are not a profile's own (a global repetition guard, say): a profile's
    own processors come only from its ``Profile.logits_processors`` method, which the core calls
    first. Called for every generation (training previews, ``trainer generate``) with the
    active ``Profile`` instance, the tokenizer and the resolved ``TrainerConfig``; return
    ``None`` or an empty list to add nothing. Results are concatenated after the profile's own,
    in plugin registration order. Processors must keep per-row state for batched, left-padded
    generation and must not leak state between calls: return fresh objects each time. They
    never affect the training loss.
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
