"""Plugin discovery and the profile registry.

Plugins are modules listed in the ``trainer`` entry-point group of installed distributions. We
load them one by one (like ``pluggy.PluginManager.load_setuptools_entrypoints("trainer")``) so
that one that fails to import, or whose ``register_profiles`` raises, is recorded as broken and
the rest keep working. ``TRAINER_PLUGINS`` (comma-separated distribution names; empty = none)
restricts which third-party distributions load, for reproducible runs.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from typing import Any, cast

import attrs
import pluggy

from trainer_core import hookspecs
from trainer_core.errors import UserError
from trainer_core.plugins.profile import Profile

ENTRY_POINT_GROUP = "trainer"
ALLOW_ENV = "TRAINER_PLUGINS"
BUILTIN_NAME = "trainer_core.plugins.builtin"
#: Other plugins that ship inside trainer-core, loaded by module name exactly as an entry point
#: would be (so a lower layer never imports them): the built-in trackers.
BUILTIN_PLUGINS = ("trainer_core.monitor.trackers",)


@attrs.define
class PluginInfo:
    """What ``trainer plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    hooks: list[str] = attrs.field(factory=list)
    status: str = "ok"  # ok | broken | skipped
    error: str | None = None


@attrs.define(frozen=True)
class ProfileEntry:
    """A registered profile class and where it came from."""

    cls: type[Profile]
    plugin: str
    distribution: str
    version: str


@attrs.define
class Registry:
    """The loaded plugin manager, the plugins it knows and the profiles they registered."""

    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo]
    profiles: dict[str, ProfileEntry] = attrs.field(factory=dict)
    #: Profile names registered by more than one plugin: name -> plugin names.
    conflicts: dict[str, list[str]] = attrs.field(factory=dict)


def _allowed() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV)
    if raw is None:
        return None
    return {_norm(n) for n in raw.split(",") if n.strip()}


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _hook_names(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    return sorted(h.name for h in pm.get_hookcallers(plugin) or [])


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("trainer")
    pm.add_hookspecs(hookspecs)
    return pm


def build_registry() -> Registry:
    """Load the built-in plugin and every allowed entry-point plugin; collect profiles."""
    from trainer_core import __version__
    from trainer_core.plugins import builtin

    pm = _new_manager()
    plugins: dict[str, PluginInfo] = {}
    pm.register(builtin, name=BUILTIN_NAME)
    plugins[BUILTIN_NAME] = PluginInfo(
        BUILTIN_NAME, "trainer-core", __version__, _hook_names(pm, builtin)
    )
    for module_name in BUILTIN_PLUGINS:
        info = PluginInfo(module_name, "trainer-core", __version__)
        plugins[module_name] = info
        try:
            plugin = importlib.import_module(module_name)
            pm.register(plugin, name=module_name)
        except Exception as exc:  # keep the CLI alive, as for any plugin
            info.status, info.error = "broken", f"{type(exc).__name__}: {exc}"
            continue
        info.hooks = _hook_names(pm, plugin)
    allowed = _allowed()
    seen: set[str] = set()
    for dist in md.distributions():
        dist_name = dist.metadata["Name"] or "?"
        if _norm(dist_name) in seen:  # the same distribution on sys.path twice
            continue
        seen.add(_norm(dist_name))
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.get_plugin(ep.name) is not None:
                continue
            info = PluginInfo(ep.name, dist_name, dist.version)
            plugins[ep.name] = info
            if allowed is not None and _norm(dist_name) not in allowed:
                info.status, info.error = "skipped", f"not in {ALLOW_ENV}"
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not break the CLI
                info.status, info.error = "broken", f"{type(exc).__name__}: {exc}"
                continue
            info.hooks = _hook_names(pm, plugin)
    registry = Registry(pm=pm, plugins=plugins)
    collect_profiles(registry)
    return registry


def register_plugin(registry: Registry, plugin: Any, name: str, distribution: str = "(in-process)",
                    version: str = "0") -> None:
    """Register an in-process plugin (tests, embedding apps) and refresh the profiles."""
    registry.pm.register(plugin, name=name)
    registry.plugins[name] = PluginInfo(name, distribution, version, _hook_names(registry.pm, plugin))
    collect_profiles(registry)


def unregister_plugin(registry: Registry, name: str) -> None:
    registry.pm.unregister(name=name)
    registry.plugins.pop(name, None)
    collect_profiles(registry)


def collect_profiles(registry: Registry) -> None:
    """Call every ``register_profiles`` implementation on its own, isolating failures."""
    registry.profiles.clear()
    registry.conflicts.clear()
    for impl in registry.pm.hook.register_profiles.get_hookimpls():
        info = registry.plugins.get(impl.plugin_name)
        if info is None or info.status != "ok":
            continue
        found: list[type[Profile]] = []

        def register(cls: type, _found: list = found) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Profile)) or not cls.name:
                raise TypeError(f"register() takes a Profile subclass with a name, got {cls!r}")
            _found.append(cls)

        try:
            impl.function(register=register)
        except Exception as exc:
            info.status, info.error = "broken", f"register_profiles: {type(exc).__name__}: {exc}"
            continue
        for cls in found:
            entry = ProfileEntry(cls, impl.plugin_name, info.distribution, info.version)
            other = registry.profiles.get(cls.name)
            if other is not None and other.plugin != impl.plugin_name:
                registry.conflicts.setdefault(cls.name, [other.plugin]).append(impl.plugin_name)
            registry.profiles[cls.name] = entry


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the registry (tests that change installed plugins or ``TRAINER_PLUGINS``)."""
    global _REGISTRY
    _REGISTRY = None


def get_profile_class(name: str) -> type[Profile]:
    """The profile class registered as ``name``; ``UserError`` listing the choices otherwise."""
    registry = get_registry()
    if name in registry.conflicts:
        owners = " and ".join(registry.conflicts[name])
        raise UserError(f"profile {name!r} is registered by more than one plugin: {owners}")
    entry = registry.profiles.get(name)
    if entry is None:
        available = ", ".join(sorted(registry.profiles)) or "(none)"
        broken = [p.name for p in registry.plugins.values() if p.status == "broken"]
        extra = f"; broken plugins: {', '.join(broken)} (see `trainer plugins`)" if broken else ""
        raise UserError(f"unknown profile {name!r}; available: {available}{extra}")
    return entry.cls


def collect_logits_processors(profile: Profile, tokenizer: Any, config: Any) -> list[Any]:
    """All plugins' processors for ``profile``, in registration order."""
    results = get_registry().pm.hook.logits_processors(
        profile=profile, tokenizer=tokenizer, config=config
    )
    # pluggy calls the last-registered implementation first; reverse to registration order.
    return [p for group in reversed(results) if group for p in group]


def build_profile(cfg: Any, today: Any = None) -> Profile:
    """The configured profile, built from ``cfg.profile.options`` (validated by its Options)."""
    cls = get_profile_class(cfg.profile.name)
    return cls.from_options(cfg.profile.options, today=today)


def collect_run_listeners(config: Any, output_dir: Any) -> list[Any]:
    """Run listeners that plugins add through the ``run_listeners`` hook, in registration order."""
    results = get_registry().pm.hook.run_listeners(config=config, output_dir=output_dir)
    return [x for group in reversed(results) if group for x in group]


def collect_trackers() -> dict[str, str]:
    """Tracker name -> the plugin that accepts it in ``environment.report_to``."""
    registry = get_registry()
    out: dict[str, str] = {}
    for impl in registry.pm.hook.trackers.get_hookimpls():
        info = registry.plugins.get(impl.plugin_name)
        if info is not None and info.status != "ok":
            continue
        names = cast("list[str] | None", impl.function())
        for name in names or []:
            out.setdefault(name, impl.plugin_name)
    return out


def check_report_to(config: Any) -> None:
    """``UserError`` naming a tracker in ``environment.report_to`` that no plugin provides."""
    known = collect_trackers()
    for name in config.environment.report_to:
        if name not in known:
            available = ", ".join(sorted(known)) or "(none)"
            raise UserError(f"environment.report_to: unknown tracker {name!r}; available: "
                            f"{available} (a tracker plugin adds more; see `trainer plugins`)")
