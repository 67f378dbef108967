"""Helpers for testing plugins: register a plugin in-process for the duration of a test.

    from trainer_core.testing import registered_plugin

    def test_my_profile():
        with registered_plugin(my_plugin_module):
            assert "my_profile" in get_registry().profiles

Or use the ``trainer_plugin`` pytest fixture (from ``trainer_core.testing``, exported as a pytest
plugin through the ``pytest11`` entry point): ``trainer_plugin(obj)`` registers ``obj`` until the
test ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from trainer_core.plugins import get_registry, register_plugin, unregister_plugin


@contextlib.contextmanager
def registered_plugin(plugin: Any, name: str | None = None) -> Iterator[Any]:
    name = name or getattr(plugin, "__name__", None) or f"inproc-{id(plugin)}"
    registry = get_registry()
    register_plugin(registry, plugin, name)
    try:
        yield plugin
    finally:
        unregister_plugin(registry, name)


@pytest.fixture
def trainer_plugin():
    """Call with a plugin object; it stays registered until the test ends."""
    with contextlib.ExitStack() as stack:

        def register(plugin: Any, name: str | None = None) -> Any:
            return stack.enter_context(registered_plugin(plugin, name))

        yield register
