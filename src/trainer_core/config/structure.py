"""One strict cattrs converter for everything the user writes (config, profile options).

Strict means: no silent coercion (``1.5`` is not an int, ``"yes"`` is not a bool), unknown keys
are rejected with a "did you mean" hint, and every problem is reported with its dotted path.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from trainer_core.errors import ConfigError

T = TypeVar("T")


#: Longest echo of a user's value in an error message: a 10^6-element list must not come back
#: as a 5 MB line.
SHOWN_CHARS = 80


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, cut to :data:`SHOWN_CHARS` (saying how long)."""
    if isinstance(value, (list, tuple, dict, set, str, bytes)) and len(value) > SHOWN_CHARS:
        # repr of a huge container is itself huge: only its start is ever built
        head = value[:SHOWN_CHARS] if not isinstance(value, (dict, set)) else list(value)[:20]
        text = repr(head)
        unit = "characters" if isinstance(value, str) else "bytes" if isinstance(
            value, bytes) else "items"
        return f"{text[:SHOWN_CHARS]}... ({len(value)} {unit})"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} chars)"


class FieldError(ValueError):
    """A field value out of range; ``str()`` is ``field: message``."""

    def __init__(self, attribute: attrs.Attribute, message: str):
        super().__init__(f"{attribute.name}: {message}")
        self.attribute = attribute
        self.message = message


def check(predicate, requirement: str):
    """An attrs validator: ``check(lambda v: v > 0, "must be > 0")`` fails with the value given.

    ``None`` always passes (optional fields use ``None`` for "not set").
    """

    def validator(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not predicate(value):
            raise FieldError(attribute, f"{requirement}, got {shown(value)}")

    return validator


def one_of(*choices: str):
    """An attrs validator for enums, with the choices in the message."""
    return check(lambda v: v in choices, "must be one of " + ", ".join(choices))


def _strict(kind: type, name: str):
    def hook(value: Any, _type: Any) -> Any:
        # bool is an int subclass in Python; never accept it where a number is meant.
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {name}, got {shown(value)}")
        if kind is float and isinstance(value, int):
            try:
                return float(value)
            except OverflowError:
                raise TypeError(f"expected {name}, got an integer too large for a number") from None
        if kind is float and isinstance(value, float) and not math.isfinite(value):
            raise TypeError(f"expected a finite number, got {shown(value)}")
        if not isinstance(value, kind):
            raise TypeError(f"expected {name}, got {shown(value)}")
        return value

    return hook


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for kind, name in ((int, "an integer"), (float, "a number"), (bool, "true or false"), (str, "a string")):
        conv.register_structure_hook(kind, _strict(kind, name))
    conv.register_structure_hook(dict, lambda v, _t: _plain_dict(v))
    # Free-form dicts (profile.options) stay as given; the profile validates their contents.
    conv.register_structure_hook_func(
        lambda t: get_origin(t) is dict and get_args(t)[1:] == (Any,), lambda v, _t: _plain_dict(v)
    )
    # A string is iterable; never let "abc" become ["a", "b", "c"].
    conv.register_structure_hook_func(
        lambda t: get_origin(t) is list, lambda v, t: _list_of(conv, v, t)
    )
    # A section given as a non-object (``"hyperparams": 5``) gets a clear message, not a crash.
    conv.register_structure_hook_factory(attrs.has, lambda cl: _object_only(conv, cl))
    return conv


def _object_only(conv: cattrs.Converter, cl: type):
    from cattrs.gen import make_dict_structure_fn

    inner: Any = make_dict_structure_fn(cl, conv, _cattrs_forbid_extra_keys=True,
                                        _cattrs_detailed_validation=True)

    def hook(value: Any, t: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {shown(value)}")
        return inner(value, t)

    return hook


def _list_of(conv: cattrs.Converter, value: Any, t: Any) -> list:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {shown(value)}")
    (item,) = get_args(t)
    return [conv.structure(v, item) for v in value]


def _plain_dict(value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {shown(value)}")
    return dict(value)


converter = make_converter()


def _join(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else str(name)


def explain_errors(exc: BaseException, path: str = "") -> list[str]:
    """Flatten a cattrs exception tree into ``dotted.path: message`` lines."""
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl)]
        out = []
        for key in sorted(exc.extra_fields):
            hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6) or [
                # initials: lr -> learning_rate, bs -> batch_size
                k for k in known if "".join(w[:1] for w in k.split("_")) == key][:1]
            tip = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(known)})"
            out.append(f"{_join(path, key)}: unknown key{tip}")
        return out
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        out = []
        for sub in exc.exceptions:
            notes = getattr(sub, "__notes__", [])
            sub_path = path
            for note in notes:
                # Plain-string notes exist too; only these two carry a location.
                if isinstance(note, AttributeValidationNote):
                    sub_path = _join(path, note.name)
                elif isinstance(note, IterableValidationNote):
                    sub_path = _join(path, note.index)
            out.extend(explain_errors(sub, sub_path))
        return out
    if isinstance(exc, FieldError):
        return [f"{_join(path, exc.attribute.name)}: {exc.message}"]
    if isinstance(exc, (ValueError, TypeError)) and len(exc.args) >= 2 and isinstance(
        exc.args[1], attrs.Attribute
    ):  # attrs' own validators: (message, attribute, ...)
        name = exc.args[1].name
        message = str(exc.args[0]).removeprefix(f"'{name}' ")
        return [f"{_join(path, name)}: {message}"]
    if isinstance(exc, KeyError):
        return [f"{_join(path, exc.args[0])}: required"]
    msg = str(exc)
    if isinstance(exc, ConfigError) and msg.startswith(path + ".") is False and path:
        return [f"{path}: {msg}"]
    return [f"{path}: {msg}" if path else msg]


def structure(data: Any, cls: type[T], path: str) -> T:
    """Structure ``data`` into ``cls`` strictly; raise ``ConfigError`` naming every bad path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected an object, got {shown(data)}")
    try:
        return converter.structure(data, cls)
    except ConfigError:
        raise
    except Exception as exc:  # cattrs raises ExceptionGroups; flatten them for the user
        lines = explain_errors(exc, path)
        raise ConfigError("; ".join(lines)) from exc


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)
