"""Tests of trainer_core.generate.processors: triggers, per-row processors, the generate helper."""

from __future__ import annotations

import pytest
import torch
import transformers

from trainer_core.generate.processors import (
    ForceEndAfterTrigger,
    LiteralTrigger,
    RepeatTrigger,
    TokenBytes,
    TokenPenalty,
    end_of_turn_ids,
    generate,
    trailing_run,
)
from trainer_core.testing import feed_processor as feed

IM_END, EOT = 151645, 151643
VOCAB = 151936  # Qwen3 models' logits width (larger than the tokenizer's vocabulary)


@pytest.fixture(scope="module")
def tok(qwen_tokenizer):
    return qwen_tokenizer  # the real Qwen3 tokenizer (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny_model(tok):
    config = transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )
    with torch.random.fork_rng():  # leave the global torch RNG as other tests expect it
        torch.manual_seed(0)
        return transformers.Qwen3ForCausalLM(config).eval()


def forced(scores: torch.Tensor) -> list[bool]:
    """Per row: is the end of turn the only reasonable choice?"""
    return [bool(row[IM_END] > 0 and row.max() == row[IM_END]) for row in scores]


def test_trailing_run_counts_exact_units():
    units = ["🛑", "⏹️"]
    assert trailing_run("x 🛑🛑🛑", units) == ("🛑", 3)
    assert trailing_run("⏹️⏹️", units) == ("⏹️", 2)
    assert trailing_run("⏹⏹️", units) == ("⏹️", 1)  # the first lacks U+FE0F
    assert trailing_run("🛑🛑 x", units) is None


def test_end_of_turn_ids(tok):
    assert end_of_turn_ids(tok) == [IM_END, EOT]


def test_token_bytes_reassembles_split_emojis(tok):
    to_bytes = TokenBytes(tok)
    for text in [" 🛡️🛡️", "\n⏹️⏹️⏹️", " ❌❌", "<think>x</think>", "héllo wörld"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(to_bytes(i) for i in ids).decode() == text
    assert to_bytes(IM_END) == b"" and to_bytes(VOCAB - 1) == b""


def test_repeat_trigger_fires_within_counts():
    trig = RepeatTrigger(["🛑", "⏹️"], 2, 4)
    assert not trig.matches_tail("🛑")
    assert trig.matches_tail("a🛑🛑") and trig.matches_tail("⏹️⏹️⏹️⏹️")
    assert not trig.matches_tail("🛑🛑🛑🛑🛑")


def test_force_end_per_row_and_penalty_growth(tok):
    proc = ForceEndAfterTrigger(tok, [LiteralTrigger("<<ANS_END>>")])
    ans = tok.encode(" <<ANS_END>>", add_special_tokens=False)  # 4 tokens
    word = tok.encode(" x", add_special_tokens=False)
    gen = [word + ans + word * 4, word * 4 + ans + word, word * 9]  # rows end at steps 5, 8, never
    outs = feed(proc, [[1, 2, 3], [4, 5], [6]], gen)
    for step, scores in enumerate(outs):
        assert forced(scores) == [step >= 5, step >= 8, False], step
    # k steps after the trigger: others lose min(1e4, 100 * 10**k), the end of turn gains 50.
    assert outs[5][0, 0] == -100 and outs[5][0, IM_END] == 50 and outs[5][0, EOT] == 50
    assert outs[6][0, 0] == -1000 and outs[7][0, 0] == -1e4 and outs[9][0, 0] == -1e4
    assert torch.equal(outs[9][2], torch.zeros(VOCAB))
    assert proc.penalty(10_000) == 1e4  # capped, no overflow


def test_force_end_penalty_options(tok):
    proc = ForceEndAfterTrigger(tok, [LiteralTrigger("!")], base=5, rate=2, end_bonus=1,
                                max_penalty=30)
    assert [proc.penalty(k) for k in range(5)] == [5, 10, 20, 30, 30]
    with pytest.raises(ValueError):
        ForceEndAfterTrigger(tok, [LiteralTrigger("!")], rate=0.5)


def test_trigger_in_prompt_does_not_count(tok):
    proc = ForceEndAfterTrigger(tok, [LiteralTrigger("<<ANS_END>>")])
    prompt = tok.encode("say <<ANS_END>>", add_special_tokens=False)
    outs = feed(proc, [prompt], [tok.encode(" ok then", add_special_tokens=False)])
    assert not any(forced(s)[0] for s in outs)


def test_reused_processor_resets_on_new_call(tok):
    proc = ForceEndAfterTrigger(tok, [LiteralTrigger("!!")])
    bang = tok.encode("!!", add_special_tokens=False)
    outs = feed(proc, [[1, 2]], [bang + [3]])
    assert forced(outs[-1]) == [True]
    # A new generation (same or different prompt, same batch size): nothing carried over.
    for prompt in ([1, 2], [7, 8, 9, 10, 11]):
        outs = feed(proc, [prompt], [[3, 3]])
        assert not any(forced(s)[0] for s in outs)
    # Same length as a continuation would have, but the previous token differs: a new call.
    feed(proc, [[1]], [bang])
    proc(torch.tensor([[5, 5, 5, 5]]), torch.zeros(1, VOCAB))
    assert proc.tracker.step == 0 and proc.tracker.fired_at == [None]


def test_token_penalty_schedule_and_sequences():
    proc = TokenPenalty([[7], [1, 2, 3]], penalty=10, schedule=[(2, 4.0), (3, 2.0)])
    assert [proc.multiplier(s) for s in range(5)] == [4.0, 4.0, 2.0, 1.0, 1.0]
    outs = feed(proc, [[9, 9]], [[1, 2, 5, 1, 2]], vocab=16)
    assert [float(o[0, 7]) for o in outs] == [-40, -40, -20, -10, -10, -10]
    # Token 3 only where the row just produced 1, 2 (steps 2 and 5).
    assert [float(o[0, 3]) for o in outs] == [0, 0, -20, 0, 0, -10]


def test_token_penalty_active_after_trigger(tok):
    start = tok.encode("<<S>>", add_special_tokens=False)
    proc = TokenPenalty([[42]], penalty=5, tokenizer=tok, active_after=[LiteralTrigger("<<S>>")])
    filler = tok.encode(" a", add_special_tokens=False)
    outs = feed(proc, [[1], [1]], [start + filler, filler * (len(start) + 1)])
    assert [float(o[0, 42]) for o in outs] == [0.0] * len(start) + [-5.0, -5.0]
    assert all(float(o[1, 42]) == 0 for o in outs)


def test_generate_left_padded_batch_and_forced_end(tok, tiny_model):
    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\na much longer question here<|im_end|>\n<|im_start|>assistant\n"]
    free = generate(tiny_model, tok, prompts, max_new_tokens=6)
    assert len(free) == 2 and all(isinstance(t, str) for t in free)
    # Each output is what the prompt alone gives: padding and the attention mask are right.
    assert generate(tiny_model, tok, prompts[1:], max_new_tokens=6) == free[1:]
    # A trigger met at once ("" matches nothing, so use the first generated text) ends the turn.
    first = tok.decode(tok.encode(free[0], add_special_tokens=False)[:1])
    proc = ForceEndAfterTrigger(tok, [LiteralTrigger(first)])
    out = generate(tiny_model, tok, prompts[:1], [proc], max_new_tokens=6)
    assert out == [first]
