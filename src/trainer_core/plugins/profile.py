"""The data-profile contract and the built-in ``plain_sft`` profile.

A profile decides what the model should learn from each chat example: it may add a system
prompt, append instructions to user turns and reshape assistant answers. It also supplies
logits processors that keep generation inside its format (previews, ``trainer generate``).

Examples are plain JSON-like dicts: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
with roles ``system``, ``user`` and ``assistant``; other top-level keys (``metadata``...) are
carried through untouched.
"""

from __future__ import annotations

import copy
import datetime as _dt
import random
from typing import Any, ClassVar

import attrs

from trainer_core.config.structure import one_of

Example = dict[str, Any]


@attrs.define(frozen=True)
class NoOptions:
    """Options class for profiles that take none (any key given is an error)."""


@attrs.define(frozen=True)
class Profile:
    """Base class for data profiles. Subclass it, set the class attributes and override methods.

    Class attributes:
      name: the name users pass to ``--profile`` (unique across installed plugins).
      version: bump it whenever ``transform`` output changes; it keys the preprocessing cache.
    The ``system_prompt(today)`` you write gets ``self.today``; use it, not ``date.today()``.
      description: one line for ``trainer profiles``.
      Options: an attrs class; ``profile.options`` from the config is structured into it
        strictly (unknown keys and wrong types are config errors naming
        ``profile.options.<field>``). Validate ranges in attrs validators.

    Instances are built by the core with ``ProfileClass(options=OptionsInstance)``; use
    ``ProfileClass.from_options(dict)`` in tests.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0"
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    options: Any = attrs.field(factory=lambda: NoOptions(), kw_only=True)
    #: The date ``{date}`` in system prompts stands for. The core sets it once per run (and keys
    #: the preprocessing cache on it) so every example of a run sees the same date.
    today: _dt.date = attrs.field(factory=_dt.date.today, kw_only=True)

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
        """The system prompt to train with on ``today``, or ``None`` for no system prompt."""
        return None

    def transform(self, example: Example, index: int, rng: random.Random) -> Example:
        """Return what the model should learn from ``example`` (a new dict; never mutate).

        Must be pure: the same ``(example, index, rng state)`` gives the same result. ``rng`` is
        seeded by the core from ``(data.seed, index)``; use it for every random choice and never
        touch the global ``random`` state.
        """
        return copy_example(example)

    def validate(self, example: Example) -> list[str]:
        """Profile-specific problems with an (already structurally valid) example.

        Return messages of the form ``"messages[1].content: why"``; empty when fine.
        """
        return []

    def logits_processors(self, tokenizer: Any, config: Any) -> list[Any]:
        """Fresh ``transformers.LogitsProcessor`` objects for generating in this format."""
        return []

    def score(self, generation: str, example: Example) -> dict[str, float | bool]:
        """Format metrics for one generated answer to ``example`` (its reference included)."""
        return {}


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


@attrs.define(frozen=True)
class PlainSFT(Profile):
    """Train on the conversations as they are, optionally with a system prompt."""

    name: ClassVar[str] = "plain_sft"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = "Train on conversations as given (optional system prompt)."
    Options: ClassVar[type] = PlainSFTOptions

    options: PlainSFTOptions = attrs.field(factory=PlainSFTOptions, kw_only=True)

    def system_prompt(self, today: _dt.date) -> str | None:
        text = self.options.system_prompt
        return text.replace("{date}", today.isoformat()) if text else None

    def transform(self, example: Example, index: int, rng: random.Random) -> Example:
        prompt = self.system_prompt(self.today)
        return apply_system_prompt(example, prompt, self.options.system_prompt_mode)
