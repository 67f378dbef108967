"""Generation-time processors of ``emoji_think`` (imports torch; loaded only when generating)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer_core.generation import ForceEndAfterTrigger, RepeatTrigger, TokenPenalty, TriggerSpec
from trainer_emoji_think.profile import STOP_WORDS, EmojiThinkOptions, Run, parse_stop, trailing_run

THINK_TAGS = ("<think>", "</think>")


class StopRunTrigger(RepeatTrigger):
    """A stop run: one emoji of the stop pool repeated ``min_count``..``max_count`` times.

    Without more information the trigger fires as soon as a run reaches ``min_count``. But the
    prompt says how long the run should be ("emit 🛑 /three times/"), so ``for_prompt`` binds
    each row to its instruction: the row then fires exactly when the instructed run is complete
    (and, as a fallback, when any stop emoji has been repeated the maximum number of times).
    Firing at the first two emojis would cut a "three times" run short.
    """

    needs_prompt = True

    def __init__(self, units: Sequence[str], min_count: int, max_count: int,
                 expected: Run | None = None):
        super().__init__(units, min_count, max_count)
        self.expected = expected
        # Instructions may ask for up to four, whatever max_count is.
        self.max_chars = max(len(u) for u in self.units) * max(STOP_WORDS)

    def matches_tail(self, text: str) -> bool:
        run = trailing_run(text, self.units)
        if run is None:
            return False
        if self.expected is None:
            return self.min_count <= run.count <= self.max_count
        return run == self.expected or run.count >= max(self.max_count, self.expected.count)

    def for_prompt(self, prompt: str) -> TriggerSpec:
        expected = parse_stop(prompt, self.units)
        if expected is None:
            return self
        return StopRunTrigger(self.units, self.min_count, self.max_count, expected)

    def __repr__(self) -> str:
        return f"StopRunTrigger({len(self.units)} emojis, {self.min_count}..{self.max_count}, " \
               f"expected={self.expected})"


def think_tag_penalty(options: EmojiThinkOptions, tokenizer: Any) -> TokenPenalty:
    """Penalise the tokens of ``<think>`` and ``</think>``, hardest in the first steps."""
    sequences = [tokenizer.encode(tag, add_special_tokens=False) for tag in THINK_TAGS]
    return TokenPenalty(sequences, penalty=options.think_tag_penalty,
                        schedule=options.think_tag_schedule)


def build_processors(options: EmojiThinkOptions, tokenizer: Any) -> list[Any]:
    """Fresh processors for one ``generate`` call: think-tag penalty, end of turn after stop."""
    trigger = StopRunTrigger(options.stop_emojis, options.stop_min, options.stop_max)
    return [
        think_tag_penalty(options, tokenizer),
        ForceEndAfterTrigger(tokenizer, [trigger], base=options.post_stop_base,
                             rate=options.post_stop_rate),
    ]
