"""regime3 at generation time: end of turn after <<ANS_END>>, no second <<ANS_START>>."""

from __future__ import annotations

import torch
from trainer_regime3.plugin import END, START, Regime3, second_start_sequences

from trainer_core.generation import generate
from trainer_core.testing import feed_processor

IM_END, EOT = 151645, 151643
VOCAB = 151936
PROMPT = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def feed(processor, prompt: list[int], generated: list[list[int]]) -> list[torch.Tensor]:
    """Every row continues the same ``prompt``."""
    return feed_processor(processor, [prompt] * len(generated), generated)


def test_second_start_sequences(qwen_tokenizer):
    tok = qwen_tokenizer
    assert [tok.decode(s) for s in second_start_sequences(tok)] == ["<<ANS_START", " <<ANS_START"]


def test_end_forced_after_answer_end_marker_per_row(qwen_tokenizer):
    tok = qwen_tokenizer
    penalty, force_end = Regime3.from_options({}).logits_processors(tok, None)
    answer = tok.encode(f"{START} (add 2 3) = 5 {END}")
    word = tok.encode(" so")
    rows = [answer + word * 3, word * 2 + answer + word, word * (len(answer) + 3)]
    outs = feed(force_end, tok.encode(PROMPT), rows)
    stops = [len(answer), len(answer) + 2, None]
    for step, scores in enumerate(outs):
        forced = [bool(scores[r].argmax() in (IM_END, EOT) and scores[r, 0] < 0) for r in range(3)]
        assert forced == [s is not None and step >= s for s in stops], step


def test_second_start_marker_penalised_only_after_the_first(qwen_tokenizer):
    tok = qwen_tokenizer
    penalty, _ = Regime3.from_options({"second_start_penalty": 7}).logits_processors(tok, None)
    start_tok, end_tok = tok.encode(START)[2], tok.encode(END)[2]  # "_START", "_END"
    first = tok.encode(f"{START} 5 <<ANS")    # opening a second marker after the first
    before = tok.encode("think <<ANS")         # no marker yet: the first one is free
    before = tok.encode(" x") * (len(first) - len(before)) + before  # both end at one step
    last = feed(penalty, tok.encode(PROMPT), [first, before])[-1]
    assert float(last[0, start_tok]) == -7 and float(last[0, end_tok]) == 0
    assert float(last[1, start_tok]) == 0
    assert float(last.abs().sum()) == 7  # nothing else touched


def test_generation_ends_after_the_answer(qwen_tokenizer, tiny_model):
    import transformers

    tok = qwen_tokenizer
    answer = f"{START} (add 2 3) = 5 {END}"
    plan = tok.encode(answer)

    class ForceAnswer(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - len(tok.encode(PROMPT))
            if step < len(plan):
                scores = torch.full_like(scores, -float("inf"))
                scores[:, plan[step]] = 0.0
            return scores

    procs = [ForceAnswer(), *Regime3.from_options({}).logits_processors(tok, None)]
    assert generate(tiny_model, tok, [PROMPT], procs, max_new_tokens=len(plan) + 6) == [answer]
    # The same processor objects again: no state carried over from the first call.
    assert generate(tiny_model, tok, [PROMPT], procs, max_new_tokens=len(plan) + 6) == [answer]
    free = generate(tiny_model, tok, [PROMPT], [ForceAnswer()], max_new_tokens=len(plan) + 6)
    assert free[0].startswith(answer) and len(free[0]) > len(answer)
