"""A profile's answer format: the value a profile declares and the check of a finished text.

``Profile.answer_format(example)`` returns an :class:`AnswerFormat` (or ``None``); the core uses
that one declaration three times: preprocessing rejects training rows whose assistant turns do
not match it, generation is held to it (``monitoring.constrain``,
``trainer_core.generate.formats``), and every preview / ``trainer generate`` row is scored
``format_ok`` against it (:func:`check_answer`).

The grammar engine is llguidance (a Rust wheel with no Python dependencies). Checking a text
here works on its bytes with a 256-token byte "tokenizer", so it needs no model tokenizer and
no torch: preprocessing and profile code can call it cheaply.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import attrs

#: The forms a format can take and what their ``source`` holds.
KINDS = ("regex", "lark", "json_schema")
#: The longest failing part :func:`check_answer` quotes.
MAX_QUOTED = 40


@attrs.frozen
class AnswerFormat:
    """The format of one assistant answer. Build it with a constructor, never directly:

    ``AnswerFormat.regex(pattern)``: the whole answer matches ``pattern`` (llguidance's regex
      syntax, the Rust ``regex`` crate's: no look-around, no back-references; ``.`` does not
      match a newline).
    ``AnswerFormat.lark(grammar)``: a context-free grammar in llguidance's Lark dialect (rule
      ``start`` is the answer; ``%json`` and ``%regex`` may embed the other forms).
    ``AnswerFormat.json_schema(schema)``: the answer is one JSON value valid against
      ``schema`` (a dict or JSON text; llguidance's JSON-schema subset), flexible whitespace.

    Values are frozen and hashable: equal formats share one compiled grammar (cached per
    process), so a profile may build a fresh value per example.
    """

    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    source: str

    @classmethod
    def regex(cls, pattern: str) -> AnswerFormat:
        """The answer is exactly one match of ``pattern`` (anchored at both ends)."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"AnswerFormat.regex needs a non-empty pattern, got {pattern!r}")
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> AnswerFormat:
        """The answer is derived from rule ``start`` of the Lark ``grammar``."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise ValueError(f"AnswerFormat.lark needs a grammar text, got {grammar!r}")
        return cls("lark", grammar)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> AnswerFormat:
        """The answer is one JSON value valid against ``schema`` (dict or JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"AnswerFormat.json_schema: not JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError("AnswerFormat.json_schema needs a JSON object (a schema), got "
                             f"{type(schema).__name__}")
        # Canonical text: equal schemas give equal values (one compiled grammar).
        return cls("json_schema", json.dumps(schema, sort_keys=True, ensure_ascii=False))

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) for this format."""
        return _grammar(self)

    def describe(self, limit: int = 120) -> str:
        """One line for listings: ``regex: <pattern>`` (cut to ``limit`` characters)."""
        text = f"{self.kind}: {self.source}".replace("\n", "\\n")
        return text if len(text) <= limit else text[: limit - 1] + "…"


@functools.lru_cache(maxsize=1024)
def _grammar(fmt: AnswerFormat) -> str:
    import llguidance

    if fmt.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(fmt.source)
    if fmt.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(fmt.source)
    return llguidance.LLMatcher.grammar_from_json_schema(fmt.source)


class FormatError(ValueError):
    """A format llguidance cannot compile (a bug in the profile that declared it)."""


# ------------------------------------------------------------------------- checking a text


class _ByteTokens:
    """A tokenizer of 256 one-byte tokens and an end token, for checking texts byte by byte."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b"<end>"]
    special_token_ids = [256]

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


@functools.lru_cache(maxsize=1)
def _byte_tokenizer() -> Any:
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokens()))


@functools.lru_cache(maxsize=1024)
def _byte_matcher(fmt: AnswerFormat) -> Any:
    """A fresh-state matcher of ``fmt`` over bytes (copied before use, never consumed)."""
    import llguidance

    matcher = llguidance.LLMatcher(_byte_tokenizer(), fmt.grammar(), log_level=0)
    if matcher.is_error():
        raise FormatError(f"{fmt.describe()}: {matcher.get_error()}")
    return matcher


def check_answer(answer_format: AnswerFormat, text: str) -> tuple[bool, str]:
    """Whether ``text`` (a finished answer, end of turn excluded) matches ``answer_format``.

    Returns ``(True, "")``, or ``(False, failed)`` where ``failed`` names the part that broke
    the format: ``at char N: '<the text from there>'`` (the first character the format does not
    allow there, quoted up to 40 characters), or ``ends early after '<the last characters>'``
    when the text is a valid beginning that stops before the format is complete. Raises
    :class:`FormatError` when the format itself does not compile.
    """
    matcher = _byte_matcher(answer_format).deep_copy()
    data = text.encode("utf-8")
    accepted = matcher.try_consume_tokens(list(data))
    if accepted == len(data):
        if matcher.is_accepting():
            return True, ""
        return False, f"ends early after {_quote(text[-MAX_QUOTED:])}"
    # Byte offset -> character offset (a character whose first byte was accepted still counts
    # as the failing one).
    char = len(data[:accepted].decode("utf-8", "ignore"))
    return False, f"at char {char}: {_quote(text[char:char + MAX_QUOTED])}"


def _quote(text: str) -> str:
    return repr(text)


def turn_formats(profile: Any, example: dict[str, Any]) -> list[tuple[int, AnswerFormat]]:
    """``(message index, format)`` for each assistant turn of ``example`` that has a format.

    The profile is asked once per assistant turn, with the example cut right before that turn
    (its messages end with the turn being answered), exactly as generation asks it.
    """
    out = []
    messages = example.get("messages", [])
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
            continue
        fmt = profile.answer_format({**example, "messages": messages[:i]})
        if fmt is not None:
            if not isinstance(fmt, AnswerFormat):
                raise TypeError(f"answer_format must return an AnswerFormat or None, got "
                                f"{type(fmt).__name__}")
            out.append((i, fmt))
    return out
