"""Layer 2, plugins: discovery and the registry, the ``Profile`` base class, the built-in profile.

May import: ``trainer_core.config``, ``trainer_core.hookspecs``, ``trainer_core.errors``.
The registry's functions are re-exported here for the layers above.
"""

from trainer_core.plugins.registry import (
    ALLOW_ENV,
    BUILTIN_NAME,
    ENTRY_POINT_GROUP,
    TRACE_ENV,
    PluginInfo,
    ProfileEntry,
    Registry,
    build_registry,
    collect_logits_processors,
    get_profile_class,
    get_registry,
    register_plugin,
    reset_registry,
    unregister_plugin,
)

__all__ = [
    "ALLOW_ENV", "BUILTIN_NAME", "ENTRY_POINT_GROUP", "PluginInfo", "ProfileEntry", "Registry",
    "TRACE_ENV", "build_registry", "collect_logits_processors", "get_profile_class", "get_registry",
    "register_plugin", "reset_registry", "unregister_plugin",
]
