"""The ``regime3`` profile: a symbolic reasoner whose final answer sits between markers.

This module is the whole plugin, written to be copied as a template for new profiles:

1. an attrs ``Options`` class (strictly structured from ``profile.options``; validators give
   ``profile.options.<field>: ...`` errors),
2. a ``Profile`` subclass declared once in its class statement (``name``, ``version``,
   ``description`` keywords; ``Options``): ``system_prompt`` (applied by trainer),
   ``transform`` (pure, idempotent), ``validate`` (sees the transformed row),
   ``answer_format`` (the format every answer must have: training rows are checked against
   it, generation is held to it, outputs are scored ``format_ok``), ``logits_processors``
   (imports torch lazily; used when ``monitoring.constrain`` is ``soft``) and ``score``,
3. a ``register_profiles`` hook implementation, declared in ``pyproject.toml`` under
   ``[project.entry-points.trainer]``.
"""

from __future__ import annotations

import copy
import datetime as dt
import random
from typing import Any

import attrs

from trainer_core import (
    SYSTEM_PROMPT_MODES,
    AnswerFormat,
    Example,
    Profile,
    check,
    hookimpl,
    one_of,
)

START = "<<ANS_START>>"
END = "<<ANS_END>>"
#: Text without ``<`` (so without a marker). Allowing a lone ``<`` (``(?:[^<]|<[^<])*``) makes
#: the closing that strict generation forces at the length limit hard to find, so the answers'
#: text may not use the markers' character at all.
_FREE = "[^<]*"
#: Every answer: free reasoning, the start marker, the answer, the end marker, end of turn.
ANSWER_FORMAT = AnswerFormat.regex(f"{_FREE}{START}{_FREE}{END}")

DEFAULT_SYSTEM_PROMPT = (
    "Today is {date}. You are a symbolic reasoner. Restate each problem in canonical "
    "(op arg1 arg2) forms and work through it step by step, concisely. Write the final answer "
    f"between {START} and {END}. Example: for \"What is 2 + 3?\" answer "
    f"{START} (add 2 3) = 5 {END}"
)


@attrs.define(frozen=True)
class Regime3Options:
    """Options of ``regime3``.

    system_prompt: ``{date}`` becomes the run's date (ISO); empty for none.
    system_prompt_mode: ``replace`` (default), ``keep`` (an example's own system message wins)
      or ``none`` (leave system messages alone).
    post_answer_base, post_answer_rate: after ``<<ANS_END>>`` every other token loses
      ``base * rate**k`` (k = steps since the marker) and the end of turn gains 50.
    second_start_penalty: subtracted from the token that would open a second ``<<ANS_START>>``.
    """

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    system_prompt_mode: str = attrs.field(default="replace", validator=one_of(*SYSTEM_PROMPT_MODES))
    post_answer_base: float = attrs.field(default=100.0, validator=check(lambda v: v > 0, "must be > 0"))
    post_answer_rate: float = attrs.field(default=10.0, validator=check(lambda v: v >= 1, "must be >= 1"))
    second_start_penalty: float = attrs.field(
        default=100.0, validator=check(lambda v: v >= 0, "must be >= 0")
    )


def wrap_answer(text: str) -> str:
    """Make sure ``text`` carries both markers (idempotent).

    No marker: ``<<ANS_START>> {text stripped} <<ANS_END>>``; only the start marker: append the
    end marker; only the end marker: prepend the start marker; both: unchanged.
    """
    has_start, has_end = START in text, END in text
    if has_start and has_end:
        return text
    if has_start:
        return f"{text.rstrip()} {END}"
    if has_end:
        return f"{START} {text.lstrip()}"
    body = text.strip()
    return f"{START} {body} {END}" if body else f"{START} {END}"


def extract_answer(text: str) -> str | None:
    """The whitespace-normalised text between the first start marker and the end marker after
    it, or ``None`` when the pair is missing."""
    start = text.find(START)
    if start < 0:
        return None
    end = text.find(END, start + len(START))
    if end < 0:
        return None
    return " ".join(text[start + len(START): end].split())


class Regime3(
    Profile, name="regime3", version="1",
    description=f"Symbolic reasoner: canonical (op a b) steps, final answer between {START} and {END}.",
):
    """Symbolic reasoning in ``(op arg1 arg2)`` forms, final answer between markers.

    trainer applies the system prompt (``options.system_prompt``, per
    ``options.system_prompt_mode``) before ``transform``.
    """

    Options = Regime3Options

    def system_prompt(self, today: dt.date) -> str | None:
        text = self.options.system_prompt
        return text.replace("{date}", today.isoformat()) if text else None

    def transform(self, example: Example, index: int, rng: random.Random) -> Example:
        # No random choices here, so ``rng`` is unused.
        out = copy.deepcopy(example)
        for message in out["messages"]:
            if message["role"] == "assistant" and isinstance(message["content"], str):
                message["content"] = wrap_answer(message["content"])
        return out

    def validate(self, example: Example) -> list[str]:
        problems = []
        for i, message in enumerate(example.get("messages", [])):
            text = message.get("content")
            if message.get("role") != "assistant" or not isinstance(text, str):
                continue
            if text.count(START) > 1 or text.count(END) > 1:
                problems.append(f"messages[{i}].content: more than one {START} or {END}")
            elif START in text and END in text and text.index(END) < text.index(START):
                problems.append(f"messages[{i}].content: {END} comes before {START}")
        return problems

    def answer_format(self, example: Example) -> AnswerFormat | None:
        """Reasoning without ``<``, then ``<<ANS_START>>``, the answer, ``<<ANS_END>>`` and
        the end of the turn (the same for every example)."""
        return ANSWER_FORMAT

    def logits_processors(self, tokenizer: Any, config: Any) -> list[Any]:
        # Imported here: trainer_core.generation pulls in torch, and plugins must load fast.
        from trainer_core.generation import ForceEndAfterTrigger, LiteralTrigger, TokenPenalty

        o = self.options
        return [
            TokenPenalty(second_start_sequences(tokenizer), penalty=o.second_start_penalty,
                         tokenizer=tokenizer, active_after=[LiteralTrigger(START)]),
            ForceEndAfterTrigger(tokenizer, [LiteralTrigger(END)], base=o.post_answer_base,
                                 rate=o.post_answer_rate),
        ]

    def score(self, generation: str, example: Example) -> dict[str, float | bool]:
        """has_markers: start marker then end marker; answer_extracted: non-empty text between
        them; answer_matches_reference: equal (whitespace-normalised) to the answer in the
        example's last assistant turn."""
        answers = [m["content"] for m in example["messages"] if m["role"] == "assistant"]
        reference = extract_answer(wrap_answer(answers[-1])) if answers else None
        got = extract_answer(generation)
        return {
            "has_markers": got is not None,
            "answer_extracted": bool(got),
            "answer_matches_reference": bool(got) and got == reference,
        }


def second_start_sequences(tokenizer: Any) -> list[list[int]]:
    """Token sequences that would open a second ``<<ANS_START>>``.

    Each runs up to the first token where the start marker's tokens differ from the end
    marker's (``<<`` ``ANS`` ``_START`` for Qwen), so only that token is penalised and
    ``<<ANS_END>>`` stays free. Variants cover the marker glued to text or after a space.
    """
    sequences = []
    for lead in ("", " "):
        start = tokenizer.encode(lead + START, add_special_tokens=False)
        end = tokenizer.encode(lead + END, add_special_tokens=False)
        cut = next((i for i, (a, b) in enumerate(zip(start, end, strict=False)) if a != b), len(start) - 1)
        if start[: cut + 1] not in sequences:
            sequences.append(start[: cut + 1])
    return sequences


@hookimpl
def register_profiles(register):
    register(Regime3)
