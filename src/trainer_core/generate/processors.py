"""Shared generation mechanics for profiles: trigger detection, logits processors, ``generate``.

Profiles keep generation inside their format with two processors built here:

* ``ForceEndAfterTrigger``: once a row's generated text ends with a complete trigger (a
  ``TriggerSpec``), every later step forces the end of the turn.
* ``TokenPenalty``: subtracts a (step-scheduled) penalty from the logits of given token
  sequences, optionally only after a trigger has fired.

Both keep per-row incremental state (``RowTracker``): each step decodes only the newly generated
token into a bounded byte tail, so the cost per step does not grow with the generated length.

Contract: create fresh processors for every ``model.generate`` call (the ``logits_processors``
hook does). As a safety net a processor also resets itself when a call starts over (the batch
size changes, the sequence does not grow by exactly one token, or the previous last token is no
longer where it was), so reusing one object for consecutive calls does not leak state.

This module imports torch and transformers; plugins should import it lazily (inside
``Profile.logits_processors``) so that loading a plugin stays cheap.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import torch
import transformers

# (END_OF_TURN_TOKENS, TokenBytes and end_of_turn_ids are public here too: re-exported.)
from trainer_core.generate.tokens import END_OF_TURN_TOKENS, TokenBytes, end_of_turn_ids  # noqa: F401

# --------------------------------------------------------------------------------- triggers


def trailing_run(text: str, units: Sequence[str]) -> tuple[str, int] | None:
    """The unit that ``text`` ends with and how often it repeats there, or ``None``.

    Units are matched exactly as spelled (an emoji with U+FE0F only counts with it). Longer units
    are tried first so that a unit that is a prefix of another never wins by accident.
    """
    for unit in sorted(units, key=len, reverse=True):
        if unit and text.endswith(unit):
            count, end = 0, len(text)
            while end >= len(unit) and text.startswith(unit, end - len(unit)):
                count += 1
                end -= len(unit)
            return unit, count
    return None


class TriggerSpec:
    """Detects a trigger at the end of the generated text.

    Subclasses implement ``matches_tail`` and set ``max_chars``, the longest text a match can
    span: the processors only ever pass the last ``max_chars`` characters (and a small margin),
    which is what keeps their cost per step constant. ``matches_tail`` is called after every
    generated token, so it must say whether the text *ends* with a complete trigger.

    A trigger whose exact form depends on the prompt (e.g. an instruction in the user turn) sets
    ``needs_prompt = True`` and overrides ``for_prompt``; the processors call it once per row
    with the decoded prompt (special tokens skipped) at the start of each generation.
    """

    max_chars: int = 0
    needs_prompt: bool = False

    def matches_tail(self, text: str) -> bool:  # pragma: no cover - abstract
        """Whether ``text`` (the tail of the generated text) ends with a complete trigger."""
        raise NotImplementedError

    def for_prompt(self, prompt: str) -> TriggerSpec:
        """The trigger to use for a row whose prompt is ``prompt`` (default: ``self``)."""
        return self


class LiteralTrigger(TriggerSpec):
    """Fires when the generated text ends with ``literal`` (e.g. ``<<ANS_END>>``)."""

    def __init__(self, literal: str):
        if not literal:
            raise ValueError("a literal trigger needs a non-empty string")
        self.literal = literal
        self.max_chars = len(literal)

    def matches_tail(self, text: str) -> bool:
        return text.endswith(self.literal)

    def __repr__(self) -> str:
        return f"LiteralTrigger({self.literal!r})"


class RepeatTrigger(TriggerSpec):
    """Fires when the generated text ends with one of ``units`` repeated ``min_count`` to
    ``max_count`` times (e.g. a run of stop emojis). Whatever precedes the run does not matter.

    As the processors check after every token, a run fires as soon as it reaches ``min_count``;
    subclasses can narrow that per prompt through ``for_prompt``.
    """

    def __init__(self, units: Sequence[str], min_count: int, max_count: int):
        if not units or any(not u for u in units):
            raise ValueError("a repeat trigger needs non-empty units")
        if not 1 <= min_count <= max_count:
            raise ValueError(f"need 1 <= min_count <= max_count, got {min_count}, {max_count}")
        self.units = tuple(units)
        self.min_count = min_count
        self.max_count = max_count
        self.max_chars = max(len(u) for u in self.units) * max_count

    def matches_tail(self, text: str) -> bool:
        run = trailing_run(text, self.units)
        return run is not None and self.min_count <= run[1] <= self.max_count

    def __repr__(self) -> str:
        return f"RepeatTrigger({self.units!r}, {self.min_count}, {self.max_count})"


# ------------------------------------------------------------------------- per-row tracking


class RowTracker:
    """Incremental per-row state for a batched, left-padded generation.

    Call ``update(input_ids)`` at the start of every processor call. The first call (or one
    that starts a new generation, see the module docstring) records the prompt length and
    resets everything; each later call consumes the one new token per row:

    * ``step``: generated tokens so far (0 on the first call: the step about to be chosen).
    * ``fired_at[row]``: the ``step`` at which one of the row's triggers first matched, else
      ``None``; a fired row stays fired (triggers latch).
    * ``recent[row]``: the last ``keep_tokens`` generated token ids.

    Per step the work is one device-to-host copy of two columns plus, for each row that has not
    fired, a bounded byte tail update and a decode of at most ~4·``max_chars`` bytes.
    """

    #: Extra characters kept beyond the longest trigger, so that the characters just before a
    #: trigger (and a U+FFFD from a multi-byte character cut at the tail start) fit.
    MARGIN_CHARS = 8

    def __init__(self, tokenizer: Any = None, triggers: Sequence[TriggerSpec] = (),
                 keep_tokens: int = 0):
        if triggers and tokenizer is None:
            raise ValueError("triggers need a tokenizer to turn tokens into text")
        self.triggers = tuple(triggers)
        self.keep_tokens = keep_tokens
        self._bytes = TokenBytes.of(tokenizer) if triggers else None
        self._tokenizer = tokenizer
        max_chars = max((t.max_chars for t in self.triggers), default=0)
        self._max_bytes = 4 * (max_chars + self.MARGIN_CHARS)  # UTF-8: at most 4 bytes a char
        self.prompt_len: int | None = None
        self.length = 0
        self.step = 0
        self.fired_at: list[int | None] = []
        self.recent: list[deque[int]] = []
        self._tails: list[bytearray] = []
        self._row_triggers: list[tuple[TriggerSpec, ...]] = []
        self._last: list[int] = []

    def update(self, input_ids: torch.Tensor) -> None:
        """Consume the current ``input_ids`` (batch x sequence) of the generation."""
        batch, length = input_ids.shape
        if self.prompt_len is None or batch != len(self._last) or length != self.length + 1:
            self._start(input_ids)
            return
        pairs = input_ids[:, -2:].tolist()  # one host copy: previous and new token per row
        if any(prev != last for (prev, _), last in zip(pairs, self._last, strict=True)):
            self._start(input_ids)
            return
        self.length = length
        self.step = length - self.prompt_len
        self._last = [new for _, new in pairs]
        for row, token in enumerate(self._last):
            if self.keep_tokens:
                self.recent[row].append(token)
            if self.fired_at[row] is not None or self._bytes is None:
                continue  # latched rows need no more text
            tail = self._tails[row]
            tail += self._bytes(token)
            if len(tail) > self._max_bytes:
                del tail[: len(tail) - self._max_bytes]
            # "replace": a multi-byte character still incomplete at the end becomes U+FFFD, so
            # a trigger never fires in the middle of a character.
            text = tail.decode("utf-8", "replace")
            if any(t.matches_tail(text) for t in self._row_triggers[row]):
                self.fired_at[row] = self.step

    def _start(self, input_ids: torch.Tensor) -> None:
        batch, length = input_ids.shape
        self.prompt_len = self.length = length
        self.step = 0
        self.fired_at = [None] * batch
        self.recent = [deque(maxlen=self.keep_tokens) for _ in range(batch)]
        self._tails = [bytearray() for _ in range(batch)]
        self._last = input_ids[:, -1].tolist()
        if any(t.needs_prompt for t in self.triggers):
            prompts = self._tokenizer.batch_decode(input_ids.tolist(), skip_special_tokens=True)
            self._row_triggers = [tuple(t.for_prompt(p) for t in self.triggers) for p in prompts]
        else:
            self._row_triggers = [self.triggers] * batch


# ------------------------------------------------------------------------------ processors


class ForceEndAfterTrigger(transformers.LogitsProcessor):
    """Force the end of the turn in every row whose generated text ended with a trigger.

    ``k`` steps after a row's trigger completed, ``min(max_penalty, base * rate**k)`` is
    subtracted from all its logits except the end-of-turn ids, which instead get ``end_bonus``
    added. Rows are independent; rows that have not triggered are left untouched. Only
    generated tokens count (the prompt is skipped). Create one per ``generate`` call.
    """

    def __init__(self, tokenizer: Any, triggers: Sequence[TriggerSpec], *,
                 end_token_ids: Sequence[int] | None = None, base: float = 100.0,
                 rate: float = 10.0, end_bonus: float = 50.0, max_penalty: float = 1e4):
        if not triggers:
            raise ValueError("ForceEndAfterTrigger needs at least one trigger")
        if base <= 0 or rate < 1 or max_penalty < base:
            raise ValueError(f"need base > 0, rate >= 1, max_penalty >= base; got {base}, "
                             f"{rate}, {max_penalty}")
        self.tracker = RowTracker(tokenizer, triggers)
        self.end_token_ids = list(end_token_ids or end_of_turn_ids(tokenizer))
        self.base, self.rate = base, rate
        self.end_bonus, self.max_penalty = end_bonus, max_penalty
        # Past this exponent the cap applies; bounding k keeps rate**k finite (no overflow).
        self._k_cap = (
            math.ceil(math.log(max_penalty / base) / math.log(rate)) if rate > 1 else 0
        )
        self._end_index: dict[tuple[torch.device, int], torch.Tensor] = {}

    def penalty(self, k: int) -> float:
        """The amount subtracted ``k`` steps after the trigger completed."""
        return min(self.max_penalty, self.base * self.rate ** min(k, self._k_cap))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tracker = self.tracker
        tracker.update(input_ids)
        if all(f is None for f in tracker.fired_at):
            return scores
        amounts = [0.0 if f is None else self.penalty(tracker.step - f) for f in tracker.fired_at]
        penalty = torch.tensor(amounts, dtype=scores.dtype, device=scores.device).unsqueeze(1)
        fired = penalty > 0
        end = self._end_ids_on(scores)
        out = scores - penalty
        # Set the end-of-turn logits from the originals: subtracting then adding back a huge
        # penalty could lose precision (or hit inf in half precision).
        out[:, end] = torch.where(fired, scores[:, end] + self.end_bonus, scores[:, end])
        return cast(torch.FloatTensor, out)

    def _end_ids_on(self, scores: torch.Tensor) -> torch.Tensor:
        key = (scores.device, scores.shape[1])
        if key not in self._end_index:
            ids = [i for i in self.end_token_ids if i < scores.shape[1]]
            self._end_index[key] = torch.tensor(ids, dtype=torch.long, device=scores.device)
        return self._end_index[key]


class TokenPenalty(transformers.LogitsProcessor):
    """Subtract a penalty from the logits of token sequences, with a schedule over steps.

    For each sequence the *last* token is penalised at a step where the row's generated tokens
    end with the rest of the sequence (so a one-token sequence is penalised at every step),
    like ``transformers``' ``sequence_bias``. The amount is ``penalty * multiplier(step)``:
    ``schedule`` is a list of ``(until_step, multiplier)`` pairs with increasing ``until_step``;
    the multiplier of the first pair with ``step < until_step`` applies, 1.0 after the last.
    ``step`` counts generated tokens from the start of the generation (0: the first one).

    With ``active_after`` triggers (and a ``tokenizer``), a row is penalised only once one of
    them has fired in it, from the step right after the trigger's last token on (e.g. "no
    second answer-start marker once one was generated").
    """

    def __init__(self, sequences: Sequence[Sequence[int]], *, penalty: float,
                 schedule: Sequence[tuple[int, float]] = (), tokenizer: Any = None,
                 active_after: Sequence[TriggerSpec] = ()):
        self.sequences = [tuple(int(t) for t in s) for s in sequences if len(s)]
        if not self.sequences:
            raise ValueError("TokenPenalty needs at least one non-empty token sequence")
        limits = [until for until, _ in schedule]
        if limits != sorted(set(limits)):
            raise ValueError(f"schedule steps must increase strictly, got {limits}")
        self.penalty = float(penalty)
        self.schedule = [(int(u), float(m)) for u, m in schedule]
        self.active_after = tuple(active_after)
        keep = max(len(s) for s in self.sequences) - 1
        self.tracker = RowTracker(tokenizer, self.active_after, keep_tokens=keep)

    def multiplier(self, step: int) -> float:
        """The schedule's multiplier at generated step ``step``."""
        for until, mult in self.schedule:
            if step < until:
                return mult
        return 1.0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tracker = self.tracker
        tracker.update(input_ids)
        amount = self.penalty * self.multiplier(tracker.step)
        if amount == 0:
            return scores
        rows: list[int] = []
        cols: list[int] = []
        vocab = scores.shape[1]
        for row, fired in enumerate(tracker.fired_at):
            if self.active_after and fired is None:
                continue  # not active yet in this row
            recent = tracker.recent[row]
            for seq in self.sequences:
                prefix = seq[:-1]
                if seq[-1] < vocab and (
                    not prefix or (len(recent) >= len(prefix) and tuple(recent)[-len(prefix):] == prefix)
                ):
                    rows.append(row)
                    cols.append(seq[-1])
        if not rows:
            return scores
        out = scores.clone()
        index = (torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device))
        out[index] = scores[index] - amount
        return cast(torch.FloatTensor, out)


# -------------------------------------------------------------------------------- generate


def left_padded(tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``prompts``, left-padded with the pad token.

    Padded here rather than by the tokenizer: asking a fast tokenizer for
    ``padding_side="left"`` switches its backend's padding to the left for good, and the
    tokenizer is shared (cached) and saved with the model afterwards.
    """
    rows = [list(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), int(tokenizer.pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, width - len(r):] = 1
    return input_ids, attention_mask


def generate(model: Any, tokenizer: Any, prompts: list[str],
             processors: Sequence[Any] = (), max_new_tokens: int = 64,
             formats: Sequence[Any] | None = None, **generate_kwargs: Any) -> list[str]:
    """Greedily continue each of ``prompts`` (already rendered text) and return the new text.

    ``prompts`` are full rendered prompts (chat template applied, ending with the assistant
    turn's opening), not user messages. The batch is left-padded with an attention mask;
    generation stops at ``<|im_end|>`` / ``<|endoftext|>`` (``end_of_turn_ids``); only the new
    tokens are decoded, special tokens skipped. ``processors`` go to ``model.generate`` as its
    ``logits_processor`` (pass fresh ones per call). ``formats``: one ``AnswerFormat`` or
    ``None`` per prompt; rows with a format are held to it (``FormatConstraint``, applied after
    ``processors``), the closing forced before ``max_new_tokens`` runs out; ``None`` rows are
    free. ``generate_kwargs`` are passed through.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token for batched generation")
    device = next(model.parameters()).device
    input_ids, attention_mask = left_padded(tokenizer, prompts)
    input_ids = input_ids.to(device)
    processors = list(processors)
    if formats is not None:
        if len(formats) != len(prompts):
            raise ValueError(f"{len(formats)} formats for {len(prompts)} prompts")
        if any(f is not None for f in formats):
            from trainer_core.generate.formats import FormatConstraint

            # Greedy (unless the caller samples): masks only for rows whose pick is outside.
            greedy = not generate_kwargs.get("do_sample", False)
            processors.append(FormatConstraint(tokenizer, formats, max_new_tokens, greedy))
    kwargs: dict[str, Any] = {
        "attention_mask": attention_mask.to(device),
        "logits_processor": transformers.LogitsProcessorList(processors),
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "eos_token_id": end_of_turn_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
    }
    kwargs.update(generate_kwargs)
    with torch.no_grad():
        out = model.generate(input_ids, **kwargs)
    return tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
