"""The data-profile contract and the built-in ``plain_sft`` profile.

A profile decides what the model should learn from each chat example: it may add a system
prompt, append instructions to user turns and reshape assistant answers. It declares the
format of its answers (``answer_format``), which the core checks training rows against, holds
generation to and scores outputs with; it may also supply logits processors (the soft way).

Examples are plain JSON-like dicts: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
with roles ``system``, ``user`` and ``assistant``; other top-level keys (``metadata``...) are
carried through untouched.
"""

from __future__ import annotations

import copy
import datetime as _dt
import random
import re
from typing import Any, ClassVar

import attrs

from trainer_core.config.structure import one_of
from trainer_core.plugins.answer_format import AnswerFormat

Example = dict[str, Any]


@attrs.define(frozen=True)
class NoOptions:
    """Options class for profiles that take none (any key given is an error)."""


#: Where the declaration keywords of ``class X(Profile, name=..., ...)`` are stored.
_DECLARED = "__trainer_profile_declared__"


@attrs.define(frozen=True)
class Profile:
    """Base class for data profiles. Declare a profile once, in its class statement::

        class Shouty(Profile, name="shouty", version="1", description="Answers in capitals."):
            @attrs.frozen
            class Options:
                shout: bool = False

            def system_prompt(self, today):
                return f"Today is {today.isoformat()}. Answer loudly."

            def transform(self, example, index, rng):
                ...

    Declaration keywords (checked when the plugin registers the class; a violation marks the
    plugin broken with the reason in ``trainer plugins``):
      name: what users pass to ``--profile``; a non-empty string of letters, digits, ``_``,
        ``-``, ``.``; unique across installed plugins.
      version: a non-empty string; bump it whenever what the profile produces changes (it keys
        the preprocessing cache).
      description: one line for ``trainer profiles``.
      system_prompt_mode: how the core applies :meth:`system_prompt` when the options have no
        ``system_prompt_mode`` field: ``replace`` (default), ``keep`` or ``none``.
    ``Options`` (an inner class or a class attribute): an attrs class; ``profile.options`` from
    the config is structured into it strictly (unknown keys and wrong types are config errors
    naming ``profile.options.<field>``); validate ranges with attrs validators. The instance is
    ``self.options``. Do not decorate the profile class with attrs or declare an ``options``
    field: the base class builds instances as ``ProfileClass(options=..., today=...)``
    (``ProfileClass.from_options(dict)`` in tests).

    Methods the core calls: :meth:`system_prompt`, :meth:`transform`, :meth:`validate`,
    :meth:`answer_format`, :meth:`logits_processors`, :meth:`score`. :meth:`prepare` is the pipeline the core runs
    on every row (system prompt, then transform); call it in tests, do not override it.

    The v1 declaration (class attributes ``name``/``version``/``description`` and an attrs
    ``options`` field) still works and warns with a ``DeprecationWarning`` at registration.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    description: ClassVar[str] = ""
    system_prompt_mode: ClassVar[str] = "replace"
    Options: ClassVar[type] = NoOptions

    options: Any = attrs.field(
        default=attrs.Factory(lambda self: type(self).Options(), takes_self=True), kw_only=True
    )
    #: The date the system prompt is written for. The core sets it once per run (and keys the
    #: preprocessing cache on it) so every example of a run sees the same date.
    today: _dt.date = attrs.field(factory=_dt.date.today, kw_only=True)

    def __init_subclass__(cls, *, name: str | None = None, version: str | None = None,
                          description: str | None = None, system_prompt_mode: str | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = {k: v for k, v in (("name", name), ("version", version),
                                       ("description", description),
                                       ("system_prompt_mode", system_prompt_mode))
                    if v is not None}
        if declared:
            for key, value in declared.items():
                setattr(cls, key, value)
            setattr(cls, _DECLARED, tuple(declared))

    @classmethod
    def from_options(
        cls,
        options: dict[str, Any] | None = None,
        path: str = "profile.options",
        today: _dt.date | None = None,
    ):
        """Build the profile from a plain options dict, with dotted-path errors."""
        from trainer_core.config.structure import structure

        opts: Any = structure(dict(options or {}), cls.Options, path)
        return cls(options=opts, today=today or _dt.date.today())

    def options_dict(self) -> dict[str, Any]:
        from trainer_core.config.structure import unstructure

        return unstructure(self.options)

    def system_prompt(self, today: _dt.date) -> str | None:
        """The system prompt to train and generate with on ``today``, or ``None`` for none.

        The core applies it before :meth:`transform` (so ``transform`` sees it), per the mode
        (``self.options.system_prompt_mode`` if the options have that field, else the class's
        declared ``system_prompt_mode``); see :func:`apply_system_prompt`.
        """
        return None

    def transform(self, example: Example, index: int, rng: random.Random) -> Example:
        """Return what the model should learn from ``example`` (a new dict; never mutate).

        ``example`` already carries the system prompt. Must be pure: the same ``(example,
        index, rng state)`` gives the same result. ``rng`` is seeded by the core from
        ``(data.seed, index)``; use it for every random choice and never touch the global
        ``random`` state.
        """
        return copy_example(example)

    def validate(self, example: Example) -> list[str]:
        """Problems with the *transformed* example (what would be trained), or ``[]``.

        Return messages such as ``"messages[1].content: why"``. A row with problems is handled
        like any other bad row, per ``data.on_invalid``: ``error`` stops the run listing them
        as ``file:line: problem``; ``skip`` drops it, counted as ``profile_invalid``. Raise
        nothing: an exception here stops the run with an error naming the row.
        """
        return []

    def answer_format(self, example: Example) -> AnswerFormat | None:
        """The format of the assistant answer that comes next in ``example``, or ``None``.

        ``example`` is the conversation up to that answer (prepared: system prompt and
        ``transform`` applied); its messages end with the turn being answered. Return an
        :class:`~trainer_core.plugins.answer_format.AnswerFormat` (``AnswerFormat.regex``,
        ``.lark`` or ``.json_schema``). The core uses it three times: every transformed
        assistant turn must match it (else the row is invalid, per ``data.on_invalid``, counted
        as ``format_invalid``), generation is held to it (``monitoring.constrain``), and each
        preview / ``trainer generate`` output is scored ``format_ok`` against it. Pure and
        cheap: it is called once per assistant turn of every training row.
        """
        return None

    def logits_processors(self, tokenizer: Any, config: Any) -> list[Any]:
        """Fresh ``transformers.LogitsProcessor`` objects for generating in this format.

        The only route for a profile's own processors (the ``logits_processors`` hook is for
        processors that apply to any profile). Called once per ``generate`` call. They are
        the ``soft`` way to keep a format (``monitoring.constrain: soft``); with ``strict``
        (the default when :meth:`answer_format` gives a format) rows are held to the format
        instead and these are not used.
        """
        return []

    def score(self, generation: str, example: Example) -> dict[str, float | bool]:
        """Format metrics for one generated answer to ``example`` (its reference included)."""
        return {}

    def effective_system_prompt_mode(self) -> str:
        """``self.options.system_prompt_mode`` when the options have it, else the declared one."""
        return getattr(self.options, "system_prompt_mode", type(self).system_prompt_mode)

    def prepare(self, example: Example, index: int, rng: random.Random) -> Example:
        """What the core trains on and prompts with: the system prompt applied, then
        :meth:`transform`. Not meant to be overridden."""
        with_prompt = apply_system_prompt(example, self.system_prompt(self.today),
                                          self.effective_system_prompt_mode())
        return self.transform(with_prompt, index, rng)


def copy_example(value: Any) -> Any:
    """A deep copy of JSON-shaped data (dicts, lists, strings, numbers...), several times faster
    than ``copy.deepcopy`` on the rows preprocessing handles; other objects go through
    ``copy.deepcopy``."""
    kind = type(value)
    if kind is dict:
        return {k: copy_example(v) for k, v in value.items()}
    if kind is list:
        return [copy_example(v) for v in value]
    if kind in _IMMUTABLE:
        return value
    return copy.deepcopy(value)


_IMMUTABLE = frozenset({str, int, float, bool, type(None)})


def apply_system_prompt(example: Example, prompt: str | None, mode: str) -> Example:
    """Return ``example`` with its system message handled per ``mode``.

    ``replace``: drop existing system messages and put ``prompt`` first; ``keep``: use ``prompt``
    only when the example has no system message; ``none``: leave messages as they are.
    """
    out = copy_example(example)
    messages = out["messages"]
    has_system = any(m["role"] == "system" for m in messages)
    if mode == "none" or prompt is None or (mode == "keep" and has_system):
        return out
    messages = [m for m in messages if m["role"] != "system"]
    out["messages"] = [{"role": "system", "content": prompt}, *messages]
    return out


SYSTEM_PROMPT_MODES = ("replace", "keep", "none")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def contract_problems(cls: Any) -> tuple[list[str], list[str]]:
    """Check a class given to ``register()``: ``(violations, deprecations)``.

    Violations (not a ``Profile`` subclass, a name that is not a usable string, no version, a
    non-string description, an unknown ``system_prompt_mode``, ``Options`` not an attrs class)
    make the registering plugin broken. Deprecations describe v1 declaration habits that still
    work.
    """
    if not (isinstance(cls, type) and issubclass(cls, Profile)):
        return [f"register() takes a Profile subclass, got {cls!r}"], []
    where = f"profile class {cls.__module__}.{cls.__qualname__}"
    fields = attrs.fields_dict(cls) if attrs.has(cls) else {}
    problems: list[str] = []
    for key in ("name", "version", "description"):
        value = getattr(cls, key, None)
        if not isinstance(value, str):
            hint = (f" (the annotation `{key}: str = ...` made it an attrs field; declare it as "
                    f"`class {cls.__name__}(Profile, {key}=...)`)" if key in fields else "")
            problems.append(f"{where}: {key} must be a string, got "
                            f"{type(value).__name__} {value!r}{hint}")
    if isinstance(cls.name, str) and not _NAME.fullmatch(cls.name):
        problems.append(f"{where}: name must be letters, digits, '_', '-' or '.' "
                        f"(not starting with a symbol), got {cls.name!r}")
    if isinstance(cls.version, str) and not cls.version.strip():
        problems.append(f"{where}: no version; declare `class {cls.__name__}(Profile, "
                        "name=..., version=\"1\")`")
    if cls.system_prompt_mode not in SYSTEM_PROMPT_MODES:
        problems.append(f"{where}: system_prompt_mode must be one of "
                        f"{', '.join(SYSTEM_PROMPT_MODES)}, got {cls.system_prompt_mode!r}")
    options_cls = getattr(cls, "Options", None)
    if not (isinstance(options_cls, type) and attrs.has(options_cls)):
        problems.append(f"{where}: Options must be an attrs class (decorate it with "
                        f"@attrs.frozen), got {options_cls!r}")
    deprecated: list[str] = []
    owner = next((k for k in cls.__mro__ if "name" in k.__dict__), Profile)
    if owner is not Profile and "name" not in owner.__dict__.get(_DECLARED, ()):
        deprecated.append(f"{where}: v1 declaration (class attributes name/version/"
                          f"description); write `class {cls.__name__}(Profile, name=..., "
                          "version=..., description=...)`")
    own_fields = {a.name: a for a in cls.__dict__.get("__attrs_attrs__", ())}
    option_field = own_fields.get("options")
    if option_field is not None and not option_field.inherited:
        deprecated.append(f"{where}: declares an `options` attrs field (v1); the Options class "
                          "is enough, drop the field and the @attrs.define decorator")
    return problems, deprecated


@attrs.define(frozen=True)
class PlainSFTOptions:
    """Options of ``plain_sft``.

    system_prompt: text of a system prompt to add (``{date}`` becomes today's ISO date); empty
      for none.
    system_prompt_mode: ``keep`` (default: an example's own system message wins), ``replace``
      or ``none``.
    """

    system_prompt: str = ""
    system_prompt_mode: str = attrs.field(default="keep", validator=one_of(*SYSTEM_PROMPT_MODES))


class PlainSFT(Profile, name="plain_sft", version="1",
               description="Train on conversations as given (optional system prompt).",
               system_prompt_mode="keep"):
    """Train on the conversations as they are, optionally with a system prompt."""

    Options = PlainSFTOptions

    def system_prompt(self, today: _dt.date) -> str | None:
        text = self.options.system_prompt
        return text.replace("{date}", today.isoformat()) if text else None
