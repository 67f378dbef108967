"""emoji_think at generation time: stop-run detection, think-tag penalty, real generate."""

from __future__ import annotations

import datetime as dt
import random

import pytest
import torch
import transformers
from trainer_emoji_think.processors import StopRunTrigger, build_processors
from trainer_emoji_think.profile import STOP_EMOJIS, STOP_WORDS, EmojiThink, Run, stop_instruction

from trainer_core.generation import ForceEndAfterTrigger, TokenPenalty, generate
from trainer_core.testing import feed_processor as feed

IM_END, EOT = 151645, 151643
VOCAB = 151936
LEADS = ["", " ", "\n"]
PROFILE = EmojiThink.from_options({}, today=dt.date(2025, 3, 14))


def chatml_prompt(user: str) -> str:
    return (f"<|im_start|>system\nToday is 2025-03-14.<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def first_forced(outs: list[torch.Tensor]) -> list[int | None]:
    """Per row, the first step whose scores force the end of turn."""
    result: list[int | None] = [None] * outs[0].shape[0]
    for step, scores in enumerate(outs):
        for row in range(scores.shape[0]):
            if result[row] is None and scores[row].argmax() in (IM_END, EOT) and scores[row, 0] < 0:
                result[row] = step
    return result


def force_end(tok) -> ForceEndAfterTrigger:
    return next(p for p in build_processors(PROFILE.options, tok) if isinstance(p, ForceEndAfterTrigger))


def run_cases():
    return [(e, c, lead) for e in STOP_EMOJIS for c in STOP_WORDS for lead in LEADS]


def pad_right(rows: list[list[int]], filler: int, extra: int = 2) -> list[list[int]]:
    width = max(map(len, rows)) + extra
    return [r + [filler] * (width - len(r)) for r in rows]


# ------------------------------------------------------------------ stop-run detection


@pytest.mark.parametrize(("emoji", "count", "lead"), run_cases())
def test_trigger_matches_every_stop_run(emoji, count, lead):
    trigger = StopRunTrigger(STOP_EMOJIS, 2, 4)
    assert trigger.matches_tail("Answer" + lead + emoji * count)
    assert not trigger.matches_tail("Answer" + lead + emoji)
    bound = trigger.for_prompt("Q\n\n" + stop_instruction(Run(emoji, count)))
    assert bound.matches_tail(lead + emoji * count)
    assert not any(bound.matches_tail(lead + emoji * n) for n in range(1, count))


def test_instructed_run_detected_token_by_token(qwen_tokenizer):
    """All 10 stop emojis x counts 2..4 x no lead/space/newline as rows of one batch: each row
    is forced to end exactly after its instructed run, not earlier."""
    tok = qwen_tokenizer
    cases = run_cases()
    prompts = [tok.encode(chatml_prompt("Q\n\n" + stop_instruction(Run(e, c)))) for e, c, _ in cases]
    gens = [tok.encode("🤔🤔\nAnswer" + lead + e * c) for e, c, lead in cases]
    outs = feed(force_end(tok), prompts, pad_right(gens, tok.encode(" x")[0]))
    assert first_forced(outs) == [len(g) for g in gens]


def test_uninstructed_run_detected_at_stop_min(qwen_tokenizer):
    """Without an instruction in the prompt a run fires as soon as it reaches stop_min (2)."""
    tok = qwen_tokenizer
    cases = run_cases()
    gens = [tok.encode("Answer" + lead + e * c) for e, c, lead in cases]
    outs = feed(force_end(tok), [tok.encode(chatml_prompt("Q"))] * len(cases),
                pad_right(gens, tok.encode(" x")[0]))
    # Independent oracle: the first prefix whose decoded text ends with two stop emojis.
    expected = [next(t for t in range(len(g) + 1) if tok.decode(g[:t]).endswith(e * 2))
                for g, (e, _, _) in zip(gens, cases, strict=True)]
    assert first_forced(outs) == expected


def test_rows_stop_independently(qwen_tokenizer):
    tok = qwen_tokenizer
    prompts = [tok.encode(chatml_prompt("Q\n\n" + stop_instruction(run)))
               for run in (Run("🛑", 2), Run("⏹️", 3), Run("❌", 2))]
    word = tok.encode(" w")
    gens = [tok.encode("🛑🛑") + word * 10,                       # stops after step 2
            word * 4 + tok.encode(" ⏹️⏹️⏹️") + word * 2,           # stops later
            word * 6 + tok.encode("❌") + word * 5]                 # one ❌: never
    gens = pad_right(gens, word[0], extra=0)
    proc = force_end(tok)
    stops = [2, 4 + len(tok.encode(" ⏹️⏹️⏹️")), None]
    for step, scores in enumerate(feed(proc, prompts, gens)):
        forced = [bool(scores[r].argmax() in (IM_END, EOT) and scores[r, 0] < 0) for r in range(3)]
        assert forced == [s is not None and step >= s for s in stops], step
        if step > stops[0]:  # the penalty grows with the steps since the trigger
            assert scores[0, 0] == -min(1e4, 100 * 10 ** (step - stops[0]))


# -------------------------------------------------------------------- think-tag penalty


def test_think_tag_penalty_schedule(qwen_tokenizer):
    tok = qwen_tokenizer
    think, close = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    penalty = next(p for p in build_processors(PROFILE.options, tok) if isinstance(p, TokenPenalty))
    outs = feed(penalty, [[1, 2, 3]], [tok.encode(" a") * 14])
    expected = [640.0] * 4 + [160.0] * 4 + [120.0] * 4 + [80.0] * 3
    assert [-float(o[0, think]) for o in outs] == expected
    assert [-float(o[0, close]) for o in outs] == expected
    assert all(float(o[0].sum()) == -2 * e for o, e in zip(outs, expected, strict=True))  # nothing else

    custom = EmojiThink.from_options({"think_tag_penalty": 10, "think_tag_schedule": [[2, 3]]})
    penalty = build_processors(custom.options, tok)[0]
    outs = feed(penalty, [[1]], [tok.encode(" a") * 3])
    assert [-float(o[0, think]) for o in outs] == [30.0, 30.0, 10.0, 10.0]


# --------------------------------------------------------------------- real generation


class ForceTokens(transformers.LogitsProcessor):
    """Test helper: row ``r`` must emit ``plan[r]`` first; then the model chooses."""

    def __init__(self, plan: list[list[int]]):
        self.plan = plan
        self.start: int | None = None

    def __call__(self, input_ids, scores):
        if self.start is None or input_ids.shape[1] <= self.start:  # a new generate call
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        out = scores.clone()
        for row, seq in enumerate(self.plan):
            if step < len(seq):
                out[row] = -float("inf")
                out[row, seq[step]] = 0.0
        return out


def _setup(tok):
    """Prompts built by the profile, and what each row is made to emit first."""
    rows = [  # (instructed stop run, forced beginning of the answer)
        (Run("🛑", 3), "🤔🤔\nHi\n🛑🛑🛑"),
        (Run("⏹️", 2), "💭💭\nok ⏹️⏹️"),
        (Run("🛑", 3), "🧠🧠\nA 🛑🛑"),       # two of three: not finished, keeps going
        (Run("❌", 4), "✨✨\nno stop"),
    ]
    prompts = []
    for run, _ in rows:
        user = "Q\n\n" + stop_instruction(run)
        example = PROFILE.prepare({"messages": [{"role": "user", "content": user}]}, 0, random.Random(0))
        prompts.append(chatml_prompt(example["messages"][-1]["content"]))
    plan = [tok.encode(text) for _, text in rows]
    return prompts, plan, [text for _, text in rows]


def test_generation_ends_right_after_the_stop_run(qwen_tokenizer, tiny_model):
    tok = qwen_tokenizer
    prompts, plan, texts = _setup(tok)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = tiny_model.generate(
        enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False, max_new_tokens=16,
        logits_processor=transformers.LogitsProcessorList([ForceTokens(plan), *PROFILE.logits_processors(tok, None)]),
        eos_token_id=[IM_END, EOT], pad_token_id=EOT,
    )
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    for row in (0, 1):  # the next token after the instructed run ends the turn
        assert new[row][: len(plan[row])] == plan[row]
        assert new[row][len(plan[row])] in (IM_END, EOT)
    for row in (2, 3):  # no (complete) stop run: the model goes on
        assert new[row][len(plan[row])] not in (IM_END, EOT)


def test_no_state_leaks_between_generate_calls(qwen_tokenizer, tiny_model):
    tok = qwen_tokenizer
    prompts, plan, texts = _setup(tok)
    no_stop_plan = [plan[2], plan[3], plan[2], plan[3]]  # no row completes its stop run
    free = generate(tiny_model, tok, prompts, [ForceTokens(no_stop_plan)], 16)

    fresh = generate(tiny_model, tok, prompts, [ForceTokens(plan), *PROFILE.logits_processors(tok, None)], 16)
    assert fresh[:2] == texts[:2]  # ended right after the run
    assert fresh[2:] == free[2:]   # untouched

    # One processor list object for consecutive calls: each call behaves like a fresh one; in
    # particular rows that fired in the previous call are not cut short in the next.
    reused = [ForceTokens(plan), *PROFILE.logits_processors(tok, None)]
    assert generate(tiny_model, tok, prompts, reused, 16) == fresh
    assert generate(tiny_model, tok, prompts, [ForceTokens(no_stop_plan), *reused[1:]], 16) == free
    assert generate(tiny_model, tok, prompts, reused, 16) == fresh
