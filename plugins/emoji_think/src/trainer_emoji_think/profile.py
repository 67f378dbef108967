"""The ``emoji_think`` profile: open answers with a run of a "thinking" emoji, close them with a
run of a "stop" emoji, both as instructed in the user turn.

Pure Python (no torch): this module is imported whenever the plugin loads. The processors live
in ``trainer_emoji_think.processors`` and are imported only when generating.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import random
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import attrs

from trainer_core import SYSTEM_PROMPT_MODES, AnswerFormat, Example, Profile, check, one_of

THINKING_EMOJIS = ("🤔", "💭", "🧠", "💡", "🎯", "🔍", "🤨", "🧐", "⚡", "✨")
STOP_EMOJIS = ("🛑", "⛔", "🚫", "❌", "🔴", "⏹️", "🔚", "✋", "🚦", "🛡️")  # ⏹️ 🛡️: + U+FE0F
#: Stop counts are spelled with these words, so they must stay within 2..4.
STOP_WORDS = {2: "twice", 3: "three times", 4: "four times"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty")
THINK_SENTENCE = "For this task, think with {emoji} /{count}/ times."
STOP_SENTENCE = "When finished, emit {emoji} /{count}/ to signal completion."
DEFAULT_SYSTEM_PROMPT = "Today is {date}. You are happy. You enjoy helping others."
#: Generated steps [0, 4) x8, [4, 8) x2, [8, 12) x1.5, then x1.
DEFAULT_THINK_TAG_SCHEDULE = ((4, 8.0), (8, 2.0), (12, 1.5))
# A tag and the newline right after it: "<think>\nA\n</think>\n\nB" becomes "A\n\nB".
_THINK_TAG = re.compile(r"</?think>\n?")


@dataclasses.dataclass(frozen=True)
class Run:
    """An emoji repeated ``count`` times."""

    emoji: str
    count: int


# ------------------------------------------------------------------------ text helpers


def count_word(n: int) -> str:
    """``3`` -> ``"three"``; digits beyond twenty (only reachable from data, not from draws)."""
    return NUMBER_WORDS[n] if 0 < n < len(NUMBER_WORDS) else str(n)


def think_instruction(run: Run) -> str:
    return THINK_SENTENCE.format(emoji=run.emoji, count=count_word(run.count))


def stop_instruction(run: Run) -> str:
    return STOP_SENTENCE.format(emoji=run.emoji, count=STOP_WORDS[run.count])


def _alternation(units: Sequence[str]) -> str:
    return "|".join(re.escape(u) for u in sorted(units, key=len, reverse=True))


def think_pattern(pool: Sequence[str]) -> re.Pattern[str]:
    """Matches a thinking instruction naming an emoji of ``pool``."""
    return re.compile(
        r"For this task, think with (?P<emoji>" + _alternation(pool) + r") /(?P<count>[a-z]+|\d+)/ times\."
    )


def stop_pattern(pool: Sequence[str]) -> re.Pattern[str]:
    """Matches a stop instruction naming an emoji of ``pool``."""
    words = "|".join(STOP_WORDS.values())
    return re.compile(
        r"When finished, emit (?P<emoji>" + _alternation(pool) + r") /(?P<count>" + words
        + r")/ to signal completion\."
    )


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    matches = list(pattern.finditer(text))
    return matches[-1] if matches else None


def parse_think(text: str, pool: Sequence[str]) -> Run | None:
    """The last thinking instruction in ``text``, or ``None``."""
    m = _last_match(think_pattern(pool), text)
    if m is None:
        return None
    word = m["count"]
    if word.isdigit():
        count = int(word)
    elif word in NUMBER_WORDS:
        count = NUMBER_WORDS.index(word)
    else:
        return None
    return Run(m["emoji"], count) if count > 0 else None


def parse_stop(text: str, pool: Sequence[str]) -> Run | None:
    """The last stop instruction in ``text``, or ``None``."""
    m = _last_match(stop_pattern(pool), text)
    if m is None:
        return None
    count = next(n for n, w in STOP_WORDS.items() if w == m["count"])
    return Run(m["emoji"], count)


def leading_run(text: str, pool: Sequence[str]) -> Run | None:
    """The emoji of ``pool`` that ``text`` starts with and how often it repeats there."""
    for unit in sorted(pool, key=len, reverse=True):
        if text.startswith(unit):
            count = 0
            while text.startswith(unit, count * len(unit)):
                count += 1
            return Run(unit, count)
    return None


def trailing_run(text: str, pool: Sequence[str]) -> Run | None:
    """The emoji of ``pool`` that ``text`` ends with and how often it repeats there."""
    for unit in sorted(pool, key=len, reverse=True):
        if text.endswith(unit):
            count, end = 0, len(text)
            while end >= len(unit) and text.startswith(unit, end - len(unit)):
                count, end = count + 1, end - len(unit)
            return Run(unit, count)
    return None


def stop_suffix(text: str, pool: Sequence[str]) -> Run | None:
    """The stop run ``text`` ends with, when it has an allowed count (2..4)."""
    run = trailing_run(text, pool)
    return run if run is not None and run.count in STOP_WORDS else None


def strip_think_tags(text: str) -> str:
    """Remove literal ``<think>``/``</think>`` tags (keeping what is between them).

    A newline right after a tag goes with it, and when tags were found the result is stripped,
    so ``"<think>\\nA\\n</think>\\n\\nB"`` becomes ``"A\\n\\nB"``. Repeated until stable, since
    removing one tag can join text into another (``<<think>think>``).
    """
    out = text
    while True:
        new = _THINK_TAG.sub("", out)
        if new == out:
            break
        out = new
    return out if out == text else out.strip()


# -------------------------------------------------------------------------------- options


def _pool(disjoint_from: str = ""):
    """attrs validator of an emoji pool; ``disjoint_from`` names a pool it must not overlap."""

    def validate(inst: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        if not value:
            raise ValueError(f"'{attribute.name}' must not be empty", attribute, value)
        for emoji in value:
            # No ASCII (so no "/") and no whitespace: the instruction sentences must stay parseable.
            if not emoji or any(c.isspace() or c.isascii() for c in emoji):
                raise ValueError(
                    f"'{attribute.name}' must hold emojis (no ASCII or whitespace), got {emoji!r}",
                    attribute, value,
                )
        if len(set(value)) != len(value):
            raise ValueError(f"'{attribute.name}' has duplicates: {list(value)}", attribute, value)
        shared = set(value) & set(getattr(inst, disjoint_from)) if disjoint_from else set()
        if shared:
            raise ValueError(
                f"'{attribute.name}' shares emojis with {disjoint_from}: {sorted(shared)}",
                attribute, value,
            )

    return validate


def _at_least(field: str):
    """attrs validator: the value must be >= the (already set) field ``field``."""

    def validate(inst: Any, attribute: attrs.Attribute, value: int) -> None:
        low = getattr(inst, field)
        if value < low:
            raise ValueError(
                f"'{attribute.name}' must be >= {field} ({low}), got {value!r}", attribute, value
            )

    return validate


def _schedule(_inst: Any, attribute: attrs.Attribute, value: tuple[tuple[int, float], ...]) -> None:
    steps = [step for step, _ in value]
    if any(s <= 0 for s in steps) or steps != sorted(set(steps)):
        raise ValueError(
            f"'{attribute.name}' steps must be positive and strictly increasing, got {steps}",
            attribute, value,
        )
    if any(mult < 0 for _, mult in value):
        raise ValueError(f"'{attribute.name}' multipliers must be >= 0", attribute, value)


def _as_schedule(value: Any) -> tuple[tuple[int, float], ...]:
    return tuple((int(step), float(mult)) for step, mult in value)


@attrs.define(frozen=True)
class EmojiThinkOptions:
    """Options of ``emoji_think`` (``profile.options`` in the config).

    thinking_emojis, stop_emojis: the pools (disjoint, no duplicates, no ASCII or whitespace).
    think_min, think_max: thinking run length (1..20); stop_min, stop_max: stop run length
      (2..4: the instructions spell it twice / three times / four times).
    system_prompt: ``{date}`` becomes the run's date; empty for none. system_prompt_mode:
      ``replace`` (default), ``keep`` or ``none``.
    apply_fraction: share of examples that get the format (decided per example from its rng).
    think_tag_penalty, think_tag_schedule: generation; subtracted from the logits of the
      ``<think>``/``</think>`` tokens, times the multiplier of ``[until_step, multiplier]``
      pairs (x8 for steps 0-3, x2 for 4-7, x1.5 for 8-11, then x1 by default).
    post_stop_base, post_stop_rate: generation; ``k`` steps after the stop run every token but
      the end of turn loses ``min(1e4, base * rate**k)``.

    Lists arrive as JSON lists and are stored as tuples (so options stay hashable).
    """

    thinking_emojis: list[str] = attrs.field(
        default=THINKING_EMOJIS, converter=tuple, validator=_pool()
    )
    stop_emojis: list[str] = attrs.field(
        default=STOP_EMOJIS, converter=tuple, validator=_pool("thinking_emojis")
    )
    think_min: int = attrs.field(default=2, validator=check(lambda v: 1 <= v <= 20, "must be in 1..20"))
    think_max: int = attrs.field(
        default=8,
        validator=[check(lambda v: 1 <= v <= 20, "must be in 1..20"), _at_least("think_min")],
    )
    stop_min: int = attrs.field(default=2, validator=check(lambda v: 2 <= v <= 4, "must be in 2..4"))
    stop_max: int = attrs.field(
        default=4,
        validator=[check(lambda v: 2 <= v <= 4, "must be in 2..4"), _at_least("stop_min")],
    )
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    system_prompt_mode: str = attrs.field(default="replace", validator=one_of(*SYSTEM_PROMPT_MODES))
    apply_fraction: float = attrs.field(
        default=1.0, validator=check(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
    )
    think_tag_penalty: float = attrs.field(default=80.0, validator=check(lambda v: v >= 0, "must be >= 0"))
    think_tag_schedule: list[tuple[int, float]] = attrs.field(
        default=DEFAULT_THINK_TAG_SCHEDULE, converter=_as_schedule, validator=_schedule
    )
    post_stop_base: float = attrs.field(default=100.0, validator=check(lambda v: v > 0, "must be > 0"))
    post_stop_rate: float = attrs.field(default=10.0, validator=check(lambda v: v >= 1, "must be >= 1"))


# -------------------------------------------------------------------------------- profile


class Draw(NamedTuple):
    """The per-example random choices."""

    applies: bool
    think: Run
    stop: Run


class EmojiThink(
    Profile, name="emoji_think", version="1",
    description=("Open answers with a run of a thinking emoji and close them with a run of a "
                 "stop emoji, as instructed in the user turn."),
):
    """Answers open with ``{E x n}\\n`` and close with ``\\n{S x m}``, as the user turn asks.

    Draws: one (thinking emoji, count, stop emoji, count) per example, from the example's rng,
    shared by all its turns. Data wins over draws: an assistant turn that already starts with a
    thinking emoji run or ends with a stop run (2..4) keeps it, and an instruction already in the
    user turn is kept; the user turn's instruction is always made to name exactly what the
    assistant turn after it does (rewriting the instruction sentence if data disagree). The
    system prompt (``options.system_prompt``, per ``options.system_prompt_mode``) is applied by
    trainer before ``transform``.
    """

    Options = EmojiThinkOptions

    def system_prompt(self, today: dt.date) -> str | None:
        text = self.options.system_prompt
        return text.replace("{date}", today.isoformat()) if text else None

    def draw(self, rng: random.Random) -> Draw:
        """The example's choices; always the same number of rng calls, in this order."""
        o = self.options
        applies = rng.random() < o.apply_fraction
        think = Run(rng.choice(o.thinking_emojis), rng.randint(o.think_min, o.think_max))
        stop = Run(rng.choice(o.stop_emojis), rng.randint(o.stop_min, o.stop_max))
        return Draw(applies, think, stop)

    def transform(self, example: Example, index: int, rng: random.Random) -> Example:
        drawn = self.draw(rng)
        out = copy.deepcopy(example)
        if not drawn.applies:
            return out
        messages = out["messages"]
        for m in messages:
            if m["role"] == "assistant" and isinstance(m["content"], str):
                m["content"] = strip_think_tags(m["content"])
        # The runs each assistant turn must carry: those of the user turn before it.
        current = (drawn.think, drawn.stop)
        for i, m in enumerate(messages):
            if not isinstance(m.get("content"), str):
                continue
            if m["role"] == "user":
                answer = _next_answer(messages, i)
                current = self._resolve(m["content"], answer, drawn)
                m["content"] = self._instruct(m["content"], *current)
            elif m["role"] == "assistant":
                m["content"] = self._decorate(m["content"], *current)
        return out

    def _resolve(self, user: str, answer: str | None, drawn: Draw) -> tuple[Run, Run]:
        """Which runs a (user, answer) pair uses: the answer's own, else the user's, else drawn."""
        o = self.options
        think = (leading_run(answer, o.thinking_emojis) if answer is not None else None) \
            or parse_think(user, o.thinking_emojis) or drawn.think
        stop = (stop_suffix(answer, o.stop_emojis) if answer is not None else None) \
            or parse_stop(user, o.stop_emojis) or drawn.stop
        return think, stop

    def _instruct(self, text: str, think: Run, stop: Run) -> str:
        text = _put_sentence(text, think_pattern(self.options.thinking_emojis), think_instruction(think))
        return _put_sentence(text, stop_pattern(self.options.stop_emojis), stop_instruction(stop))

    def _decorate(self, text: str, think: Run, stop: Run) -> str:
        o = self.options
        if leading_run(text, o.thinking_emojis) is None:
            text = think.emoji * think.count + "\n" + text
        if stop_suffix(text, o.stop_emojis) is None:
            text = text + "\n" + stop.emoji * stop.count
        return text

    def validate(self, example: Example) -> list[str]:
        """Flag instruction-like sentences this profile cannot read (they would be doubled)."""
        o = self.options
        problems = []
        for i, m in enumerate(example.get("messages", [])):
            text = m.get("content")
            if m.get("role") != "user" or not isinstance(text, str):
                continue
            if text.count("For this task, think with") != len(think_pattern(o.thinking_emojis).findall(text)):
                problems.append(f"messages[{i}].content: a thinking instruction names an emoji "
                                "outside thinking_emojis or a count that is not a number word")
            if text.count("When finished, emit") != len(stop_pattern(o.stop_emojis).findall(text)):
                problems.append(f"messages[{i}].content: a stop instruction names an emoji outside "
                                "stop_emojis or a count other than twice/three times/four times")
        return problems

    def answer_format(self, example: Example) -> AnswerFormat | None:
        """The instructed runs of the last user turn: the thinking run and a newline, the answer
        (no stop emoji in it), a newline and the stop run, then the end of the turn. ``None``
        when the user turn carries no complete instruction (the format was not applied)."""
        o = self.options
        users = [m["content"] for m in example["messages"]
                 if m["role"] == "user" and isinstance(m.get("content"), str)]
        last_user = users[-1] if users else ""
        think = parse_think(last_user, o.thinking_emojis)
        stop = parse_stop(last_user, o.stop_emojis)
        if think is None or stop is None:
            return None
        return AnswerFormat.regex(answer_pattern(think, stop, o.stop_emojis))

    def logits_processors(self, tokenizer: Any, config: Any) -> list[Any]:
        from trainer_emoji_think.processors import build_processors  # torch: import lazily

        return build_processors(self.options, tokenizer)

    def score(self, generation: str, example: Example) -> dict[str, float | bool]:
        """Format metrics of ``generation`` against the instruction of ``example``'s last user turn.

        has_think_prefix: starts with a run of a thinking emoji; think_matches_instruction: with
        the instructed emoji and count; has_stop_suffix: contains a stop run (the first run of a
        stop emoji repeated 2..4 times); stop_matches_instruction: that run is the instructed
        one; stopped_after_stop: nothing follows it (the turn ended right there).
        """
        o = self.options
        users = [m["content"] for m in example["messages"] if m["role"] == "user"]
        last_user = users[-1] if users else ""
        want_think = parse_think(last_user, o.thinking_emojis)
        want_stop = parse_stop(last_user, o.stop_emojis)
        think = leading_run(generation, o.thinking_emojis)
        stop, rest = _first_stop_run(generation, o.stop_emojis)
        return {
            "has_think_prefix": think is not None,
            "think_matches_instruction": think is not None and think == want_think,
            "has_stop_suffix": stop is not None,
            "stop_matches_instruction": stop is not None and stop == want_stop,
            "stopped_after_stop": stop is not None and rest == "",
        }


def answer_pattern(think: Run, stop: Run, stop_pool: Sequence[str]) -> str:
    """The regex (llguidance's syntax) of an answer with these runs: ``think`` and ``\\n``, a
    body without any stop emoji (its first code point excluded), ``\\n`` and ``stop``."""
    banned = "".join(sorted({_class_char(e[0]) for e in stop_pool}))
    return (f"(?:{_literal(think.emoji)}){{{think.count}}}\n[^{banned}]*\n"
            f"(?:{_literal(stop.emoji)}){{{stop.count}}}")


def _literal(text: str) -> str:
    """``text`` as a regex literal (emojis need no escaping; ASCII punctuation does)."""
    return "".join("\\" + c if c.isascii() and not c.isalnum() else c for c in text)


def _class_char(char: str) -> str:
    return "\\" + char if char in "\\]^-[" else char


def _next_answer(messages: list[dict[str, Any]], i: int) -> str | None:
    """The assistant turn answering the user turn ``i`` (next non-system message), if any."""
    for m in messages[i + 1:]:
        if m["role"] == "system":
            continue
        return m["content"] if m["role"] == "assistant" and isinstance(m["content"], str) else None
    return None


def _put_sentence(text: str, pattern: re.Pattern[str], sentence: str) -> str:
    """Replace the last sentence ``pattern`` matches with ``sentence``, or append it."""
    m = _last_match(pattern, text)
    if m is not None:
        return text[: m.start()] + sentence + text[m.end():]
    return text + "\n\n" + sentence if text else sentence


def _first_stop_run(text: str, pool: Sequence[str]) -> tuple[Run | None, str]:
    """The first stop run (an emoji of ``pool`` repeated 2..4 times) and the text after it."""
    for m in re.finditer("(" + _alternation(pool) + r")\1+", text):
        count = len(m[0]) // len(m[1])
        if count in STOP_WORDS:
            return Run(m[1], count), text[m.end():]
    return None, ""
