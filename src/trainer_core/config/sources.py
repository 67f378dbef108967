"""Where a config comes from: layering defaults < preset < JSON file < CLI, with provenance.

Only values the user actually gave override a lower layer; :func:`resolve` records where each
value came from so ``trainer config show --explain`` can say so.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import attrs

from trainer_core.config.sections import (
    RETIRED,
    TrainerConfig,
    field_paths,
    flatten,
    to_dict,
    without_retired,
)
from trainer_core.config.structure import structure
from trainer_core.errors import ConfigError

# --------------------------------------------------------------------------- files


def read_json(path: str | Path) -> Any:
    """Read a JSON file; errors name the file, line and column."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{p}: invalid JSON: {exc}") from None
    if nesting_depth(data) > MAX_DEPTH:
        raise ConfigError(f"{p}: nested more than {MAX_DEPTH} levels deep")
    return data


#: No config needs more; deeper values would only reach recursion limits further down.
MAX_DEPTH = 32


def nesting_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (iterative: safe on any input)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in node)
    return deepest


def read_config_file(path: str | Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


# --------------------------------------------------------------------------- dotted overrides


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Put ``value`` at ``a.b.c`` in a nested dict, checking the path against the schema.

    ``profile.options.<key>`` is free-form below ``options`` (the profile validates it).
    """
    parts = dotted.split(".")
    known = field_paths()
    is_option = parts[:2] == ["profile", "options"] and len(parts) > 2
    if dotted not in known and not is_option:
        hint = difflib.get_close_matches(dotted, list(known), n=1, cutoff=0.6)
        tip = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{dotted}: unknown setting{tip}")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    """Parse ``section.field=value`` from ``--set``; the value is JSON if it parses, else text."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected section.field=value")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"--set {key.strip()}: value not accepted: "
                          f"{exc if isinstance(exc, ValueError) else 'nested too deeply'}") from None
    if nesting_depth(value) > MAX_DEPTH:
        raise ConfigError(f"--set {key.strip()}: nested more than {MAX_DEPTH} levels deep")
    return key.strip(), value


# --------------------------------------------------------------------------- resolution


@attrs.define(frozen=True)
class Resolved:
    """A config plus where each leaf value came from (default, preset, file or cli)."""

    config: TrainerConfig
    sources: dict[str, str]


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve(
    file: str | Path | None = None,
    cli: dict[str, Any] | None = None,
    preset: dict[str, Any] | None = None,
    file_data: dict[str, Any] | None = None,
) -> Resolved:
    """Layer defaults < preset < JSON file < CLI and validate the result.

    ``cli`` and ``preset`` map dotted paths to values; only keys present override (callers pass
    only what the user actually gave). ``file_data`` is an already-read file (for services).
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    for name, flat in (("preset", preset or {}),):
        tree: dict[str, Any] = {}
        for k, v in flat.items():
            set_dotted(tree, k, v)
        layers.append((name, tree))
    if file is not None:
        file_data = read_config_file(file)
    if file_data is not None:
        layers.append(("file", file_data))
    cli_tree: dict[str, Any] = {}
    for k, v in (cli or {}).items():
        set_dotted(cli_tree, k, v)
    layers.append(("cli", cli_tree))

    merged: dict[str, Any] = {}
    for _, tree in layers:
        merged = _merge(merged, tree)
    source_label = str(file) if file is not None else "config"
    try:
        cfg = structure(without_retired(merged), TrainerConfig, "")
    except ConfigError as exc:
        prefix = f"{source_label}: " if file is not None else ""
        raise ConfigError(f"{prefix}{exc}") from None

    sources = {k: "default" for k in flatten(to_dict(cfg))}
    for name, tree in layers:
        for k in flatten(tree):
            if k not in RETIRED:
                sources[k] = name
    return Resolved(cfg, sources)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None
                ) -> TrainerConfig:
    """Programmatic API: defaults < JSON file at ``path`` < ``overrides`` (dotted keys).

    >>> load_config(overrides={"hyperparams.learning_rate": 1e-4}).hyperparams.learning_rate
    0.0001
    """
    return resolve(file=path, cli=overrides).config
