"""Plugin discovery and the profile registry.

Plugins are modules listed in the ``trainer`` entry-point group of installed distributions. We
load them one by one (like ``pluggy.PluginManager.load_setuptools_entrypoints("trainer")``) so
that one that fails to import, or whose ``register_profiles`` raises, is recorded as broken and
the rest keep working. ``TRAINER_PLUGINS`` (comma-separated distribution names; empty = none)
restricts which third-party distributions load, for reproducible runs. ``TRAINER_TRACE_PLUGINS=1``
prints every plugin load and hook call (plugin, arguments, result, duration) on stderr.

Every hook implementation is called on its own (``call_hook``), in registration order, so a
failure is attributed to its plugin and each call can be traced.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
import time
import warnings
from typing import Any, cast

import attrs
import pluggy

from trainer_core import hookspecs
from trainer_core.errors import UserError
from trainer_core.plugins.profile import Profile, contract_problems

ENTRY_POINT_GROUP = "trainer"
ALLOW_ENV = "TRAINER_PLUGINS"
TRACE_ENV = "TRAINER_TRACE_PLUGINS"
BUILTIN_NAME = "trainer_core.plugins.builtin"
IN_PROCESS = "(in-process)"
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
    #: Deprecated declarations the plugin still uses (it works; ``trainer plugins`` shows them).
    notes: list[str] = attrs.field(factory=list)


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


def tracing() -> bool:
    return os.environ.get(TRACE_ENV, "") not in ("", "0")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _trace(what: str, started: float, outcome: str) -> None:
    ms = (time.perf_counter() - started) * 1000
    sys.stderr.write(f"trace: {what} -> {outcome} [{ms:.2f} ms]\n")
    sys.stderr.flush()


def call_hook(impl: Any, **kwargs: Any) -> Any:
    """Call one hook implementation with the arguments it names (pluggy's rule), traced when
    ``TRAINER_TRACE_PLUGINS`` is set."""
    args = {name: kwargs[name] for name in impl.argnames}
    if not tracing():
        return impl.function(**args)
    shown = ", ".join(f"{k}={_short(v)}" for k, v in args.items())
    what = f"{impl.plugin_name}: {impl.function.__name__}({shown})"
    started = time.perf_counter()
    try:
        result = impl.function(**args)
    except BaseException as exc:
        _trace(what, started, f"raised {type(exc).__name__}: {exc}")
        raise
    _trace(what, started, _short(result))
    return result


def _hookimpls(registry: Registry, hook: str) -> list[Any]:
    """Implementations of ``hook`` by plugins in good standing, in registration order."""
    impls = getattr(registry.pm.hook, hook).get_hookimpls()
    return [i for i in impls
            if registry.plugins.get(i.plugin_name, PluginInfo("", "", "")).status == "ok"]


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
            started = time.perf_counter()
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            # SystemExit too: a plugin calling sys.exit at import must not take --help with it.
            except (Exception, SystemExit) as exc:  # a broken plugin must not break the CLI
                info.status, info.error = "broken", f"{type(exc).__name__}: {exc}"
                if tracing():
                    _trace(f"load {ep.name} ({dist_name} {dist.version})", started, info.error)
                continue
            if tracing():
                _trace(f"load {ep.name} ({dist_name} {dist.version})", started, "ok")
            info.hooks = _hook_names(pm, plugin)
    registry = Registry(pm=pm, plugins=plugins)
    collect_profiles(registry)
    return registry


def register_plugin(registry: Registry, plugin: Any, name: str, distribution: str = IN_PROCESS,
                    version: str = "0") -> None:
    """Register an in-process plugin (tests, embedding apps) and refresh the profiles.

    Its profiles take precedence over same-named ones of installed (entry-point) plugins, so a
    test of a plugin under development sees the code under test even when an older copy is
    installed.
    """
    registry.pm.register(plugin, name=name)
    registry.plugins[name] = PluginInfo(name, distribution, version, _hook_names(registry.pm, plugin))
    collect_profiles(registry)


def unregister_plugin(registry: Registry, name: str) -> None:
    registry.pm.unregister(name=name)
    registry.plugins.pop(name, None)
    collect_profiles(registry)


class ContractError(TypeError):
    """A class given to ``register()`` breaks the profile contract."""


def collect_profiles(registry: Registry) -> None:
    """Call every ``register_profiles`` implementation on its own, isolating failures.

    Each registered class is checked against the contract (``contract_problems``): a violation
    marks its plugin broken; a v1 declaration warns (``DeprecationWarning``) and is noted.
    """
    registry.profiles.clear()
    registry.conflicts.clear()
    for info in registry.plugins.values():
        if info.status == "broken" and info.error and info.error.startswith("register_profiles"):
            info.status, info.error = "ok", None  # re-checked below
        info.notes.clear()
    for impl in _hookimpls(registry, "register_profiles"):
        info = registry.plugins[impl.plugin_name]
        found: list[type[Profile]] = []

        def register(cls: type, _found: list = found, _info: PluginInfo = info) -> None:
            problems, deprecated = contract_problems(cls)
            if problems:
                raise ContractError("; ".join(problems))
            for note in deprecated:
                warnings.warn(f"{note} (see docs/plugins.md, 'From v1 to v2')",
                              DeprecationWarning, stacklevel=2)
                _info.notes.append(note)
            _found.append(cls)

        try:
            call_hook(impl, register=register)
        except ContractError as exc:
            info.status, info.error = "broken", f"register_profiles: {exc}"
            continue
        # SystemExit too: a plugin calling sys.exit must not take the CLI with it.
        except (Exception, SystemExit) as exc:
            info.status, info.error = "broken", f"register_profiles: {type(exc).__name__}: {exc}"
            continue
        for cls in found:
            _add_profile(registry, ProfileEntry(cls, impl.plugin_name, info.distribution,
                                                info.version))


def _add_profile(registry: Registry, entry: ProfileEntry) -> None:
    name = entry.cls.name
    other = registry.profiles.get(name)
    if other is None or other.cls is entry.cls:  # the same class twice is no conflict
        registry.profiles[name] = other or entry
        return
    ours, theirs = entry.distribution == IN_PROCESS, other.distribution == IN_PROCESS
    if ours != theirs:  # in-process (a test's) beats installed
        registry.profiles[name] = entry if ours else other
        return
    if other.plugin != entry.plugin:
        registry.conflicts.setdefault(name, [other.plugin]).append(entry.plugin)
    registry.profiles[name] = entry


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


def collect_logits_processors(profile: Profile, tokenizer: Any, config: Any,
                              own: bool = True) -> list[Any]:
    """The processors to generate with: the profile's own (``Profile.logits_processors``, the
    one route for them; left out with ``own=False``, as strict constrained generation does),
    then those every ``logits_processors`` hook implementation adds for any profile
    (cross-cutting ones), in registration order.

    A profile or plugin that raises becomes a :class:`~trainer_core.errors.PluginError` naming
    the plugin, so the caller can skip previews with a warning instead of failing the run.
    """
    from trainer_core.errors import PluginError

    registry = get_registry()
    try:
        out = list(profile.logits_processors(tokenizer, config) or []) if own else []
    except Exception as exc:
        raise PluginError(profile_plugin_name(profile), "logits_processors", exc) from exc
    for impl in _hookimpls(registry, "logits_processors"):
        try:
            out.extend(call_hook(impl, profile=profile, tokenizer=tokenizer, config=config)
                       or [])
        except Exception as exc:
            raise PluginError(impl.plugin_name, "logits_processors", exc) from exc
    return out


def _profile_plugin(profile: Any) -> str | None:
    entry = get_registry().profiles.get(getattr(profile, "name", ""))
    if entry is None:
        return None
    # In-process plugins (tests, embedding apps) have no distribution; their name says more.
    return entry.plugin if entry.distribution.startswith("(") else entry.distribution


def profile_plugin_name(profile: Any) -> str:
    """The distribution that registered ``profile`` (for messages), else its module."""
    return _profile_plugin(profile) or type(profile).__module__


def build_profile(cfg: Any, today: Any = None) -> Profile:
    """The configured profile, built from ``cfg.profile.options`` (validated by its Options)."""
    cls = get_profile_class(cfg.profile.name)
    return cls.from_options(cfg.profile.options, today=today)


def collect_run_listeners(config: Any, output_dir: Any) -> list[Any]:
    """Run listeners that plugins add through the ``run_listeners`` hook, in registration order."""
    registry = get_registry()
    return [listener for impl in _hookimpls(registry, "run_listeners")
            for listener in (call_hook(impl, config=config, output_dir=output_dir) or [])]


def add_commands(registry: Registry, group: Any) -> None:
    """Let every ``register_commands`` implementation add commands to ``group``; one that
    raises marks its plugin broken and the CLI carries on."""
    for impl in _hookimpls(registry, "register_commands"):
        try:
            call_hook(impl, cli=group)
        except (Exception, SystemExit) as exc:  # a broken plugin must not break the CLI
            info = registry.plugins[impl.plugin_name]
            info.status, info.error = "broken", f"register_commands: {exc}"


def profile_origin(name: str) -> dict[str, str]:
    """The distribution and version that provide profile ``name`` (for run.json), or ``{}``."""
    entry = get_registry().profiles.get(name)
    if entry is None:
        return {}
    return {"distribution": entry.distribution, "distribution_version": entry.version}


def missing_profile_hint(name: str, manifest: dict[str, Any]) -> str | None:
    """What to install for a run's profile ``name`` that no loaded plugin provides, from the
    run's manifest (run.json): its recorded distribution, else the plugins it lists."""
    if name in get_registry().profiles:
        return None
    profile = manifest.get("profile") or {}
    dist, version = profile.get("distribution"), profile.get("distribution_version")
    if dist and version and dist != IN_PROCESS:
        return (f"profile {name!r} is not installed; run.json says {dist} {version}; "
                f"pip install {dist}=={version}")
    pins = [line for line in requirements(manifest.get("plugins") or [])
            if not line.startswith("trainer-core==")]
    if pins:
        return (f"profile {name!r} is not installed; run.json lists the plugins "
                f"{', '.join(pins)}; pip install {' '.join(pins)}")
    return None


def requirements(plugins: list[dict[str, str]] | None = None) -> list[str]:
    """Pinned ``distribution==version`` lines: of the plugins loaded now (``None``), or of
    ``plugins`` as run.json records them (``[{"distribution", "version"}]``)."""
    if plugins is None:
        plugins = [{"distribution": p.distribution, "version": p.version}
                   for p in get_registry().plugins.values() if p.status == "ok"]
    pins = {(p["distribution"], p["version"]) for p in plugins
            if p.get("distribution") and p["distribution"] != IN_PROCESS}
    return [f"{d}=={v}" for d, v in sorted(pins, key=lambda dv: (dv[0].lower(), dv[1]))]

def collect_trackers() -> dict[str, str]:
    """Tracker name -> the plugin that accepts it in ``environment.report_to``."""
    registry = get_registry()
    out: dict[str, str] = {}
    for impl in _hookimpls(registry, "trackers"):
        names = cast("list[str] | None", call_hook(impl))
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
