"""Where a config comes from: layering defaults < preset < config file < CLI, with provenance.

Config files are JSON, or YAML when named ``*.yaml``/``*.yml`` (same schema; errors in a YAML
file name its line: ``run.yaml:12: hyperparams.lr: unknown key (did you mean
'learning_rate'?)``). Only values the user actually gave override a lower layer;
:func:`resolve` records where each value came from so ``trainer config show --explain`` can
say so.
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


def _read_text(p: Path) -> str:
    """A config file's text (a BOM is dropped); a missing or unreadable file is a ConfigError."""
    try:
        return p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None


def read_json(path: str | Path) -> Any:
    """Read a JSON file; errors name the file, line and column."""
    p = Path(path)
    text = _read_text(p)
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


YAML_SUFFIXES = (".yaml", ".yml")


def is_yaml(path: str | Path) -> bool:
    return Path(path).suffix.lower() in YAML_SUFFIXES


def read_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """Read a YAML file (safe loader: plain data only) and the line of every key, as
    ``{"a.b": line, "a.list[0]": line}``; errors name the file and line.

    Keys YAML would read as something else than text (``on:``, ``yes:``, ``1:``), repeated
    keys and aliases (``*name``, which can expand exponentially) are refused.
    """
    import yaml

    p = Path(path)
    text = _read_text(p)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        positions: dict[str, int] = {}
        if node is None:
            return None, positions
        _key_lines(p, node, "", 1, positions)
        return loader.construct_document(node), positions
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _key_lines(p: Path, node: Any, path: str, depth: int, out: dict[str, int],
               seen: set[int] | None = None) -> None:
    import yaml

    seen = set() if seen is None else seen
    if id(node) in seen:  # the composer hands an alias its anchor's very node
        raise ConfigError(f"{p}:{node.start_mark.line + 1}: this value is used again through "
                          "an alias (*name); aliases are not supported in config files")
    seen.add(id(node))
    if depth > MAX_DEPTH:
        raise ConfigError(f"{p}:{node.start_mark.line + 1}: nested more than {MAX_DEPTH} "
                          "levels deep")
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            line = key.start_mark.line + 1
            if not isinstance(key, yaml.ScalarNode) or key.tag != "tag:yaml.org,2002:str":
                shown = key.value if isinstance(key, yaml.ScalarNode) else "a collection"
                raise ConfigError(f"{p}:{line}: key {shown!r} is not read as text by YAML; "
                                  "quote it")
            dotted = f"{path}.{key.value}" if path else key.value
            if dotted in out:
                raise ConfigError(f"{p}:{line}: {dotted}: given twice (first on line "
                                  f"{out[dotted]})")
            out[dotted] = line
            _key_lines(p, value, dotted, depth + 1, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[f"{path}[{i}]"] = item.start_mark.line + 1
            _key_lines(p, item, f"{path}[{i}]", depth + 1, out, seen)


def read_config(path: str | Path) -> tuple[dict[str, Any], dict[str, int] | None]:
    """A config file (JSON, or YAML by its suffix) and, for YAML, the line of every key."""
    if is_yaml(path):
        data, positions = read_yaml(path)
        kind: str = "YAML mapping"
    else:
        data, positions, kind = read_json(path), None, "JSON object"
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a {kind} at the top level")
    return data, positions


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's contents (JSON, or YAML when named ``*.yaml``/``*.yml``)."""
    return read_config(path)[0]


def locate(exc: ConfigError, positions: dict[str, int], label: str) -> ConfigError:
    """``exc`` with each ``dotted.path: why`` problem prefixed by ``file:line`` of that key."""
    from trainer_core.config.structure import explain_errors

    cause = exc.__cause__
    problems = explain_errors(cause) if cause is not None else str(exc).split("; ")
    out = []
    for problem in problems:
        path = problem.split(": ", 1)[0]
        while path and path not in positions:  # a.b[0].c -> a.b[0] -> a.b -> a
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        out.append(f"{label}:{positions[path]}: {problem}" if path else f"{label}: {problem}")
    return ConfigError("; ".join(out))


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
    """Layer defaults < preset < config file (JSON or YAML) < CLI and validate the result.

    ``cli`` and ``preset`` map dotted paths to values; only keys present override (callers pass
    only what the user actually gave). ``file_data`` is an already-read file (for services).
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    for name, flat in (("preset", preset or {}),):
        tree: dict[str, Any] = {}
        for k, v in flat.items():
            set_dotted(tree, k, v)
        layers.append((name, tree))
    positions = None
    if file is not None:
        file_data, positions = read_config(file)
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
        if positions is not None:
            raise locate(exc, positions, source_label) from None
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
    """Programmatic API: defaults < config file at ``path`` < ``overrides`` (dotted keys).

    >>> load_config(overrides={"hyperparams.learning_rate": 1e-4}).hyperparams.learning_rate
    0.0001
    """
    return resolve(file=path, cli=overrides).config
