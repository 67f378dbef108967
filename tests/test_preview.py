"""Previews show exactly the trained text, highlighted, with token counts."""

from __future__ import annotations

import datetime as dt
import os
import re
from typing import ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import attrs
import pytest

from trainer_core.data.chat import IGNORE_INDEX, encode
from trainer_core.data.preprocess import preprocess
from trainer_core.data.preview import preview_examples, render_preview
from trainer_core.data.tokenizer import load_tokenizer
from trainer_core.plugins.profile import PlainSFT, Profile

TRAINED = re.compile(r"\[\[(.*?)\]\]", re.S)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def conv(*turns, line=None):
    roles = ["user", "assistant"]
    row = {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}
    if line is not None:
        row["_line"] = line
    return row


def test_markers_golden(tok):
    enc = encode(conv("Hi", "Hello!")["messages"], tok, "chatml")
    out = render_preview(enc, tok, color=False)
    masked = enc.length - 3  # "Hello", "!", "<|im_end|>" are trained
    assert out == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello!<|im_end|>]]\n"
        f"trained: 3 tokens, masked: {masked} tokens"
    )


def test_multi_turn_emoji_spans_are_whole(tok):
    answers = ["🤔🤔\n2+2=4\n🛑🛑", "🫠🦜 done"]
    enc = encode(conv("q1", answers[0], "q2", answers[1])["messages"], tok, "tokenizer")
    out = render_preview(enc, tok, color=False)
    assert TRAINED.findall(out) == [a + "<|im_end|>" for a in answers]
    assert "\ufffd" not in out  # no emoji split into broken bytes
    n = sum(label != IGNORE_INDEX for label in enc.labels)
    assert out.splitlines()[-1] == f"trained: {n} tokens, masked: {enc.length - n} tokens"


def test_color_mode_uses_ansi_and_no_markers(tok):
    enc = encode(conv("Hi", "Hello!")["messages"], tok, "chatml")
    out = render_preview(enc, tok, color=True)
    assert "\x1b[1;32mHello!<|im_end|>\x1b[0m" in out
    assert "[[" not in out
    assert out.count("\x1b[1;32m") == 1  # masked text (headers, user turn) is not colored


@attrs.define(frozen=True)
class Pick(Profile):
    """Appends a word chosen with the example's rng; rejects answers containing 'bad'."""

    name: ClassVar[str] = "pick_test"

    def transform(self, example, index, rng):
        out = super().transform(example, index, rng)
        out["messages"][-1]["content"] += " " + rng.choice(["alpha", "beta", "gamma", "delta"])
        return out

    def validate(self, example):
        return ["messages[1].content: bad"] if "bad" in example["messages"][-1]["content"] else []


def test_preview_examples_match_what_preprocessing_trains(tok, tmp_path):
    rows = [conv(f"q{i}", f"answer {i}", line=i + 1) for i in range(5)]
    out = preview_examples(rows, Pick(), tok, "chatml", n=3, seed=11)
    assert out.count("=== example") == 3
    assert "=== example 1 (line 1) ===" in out and "=== example 3 (line 3) ===" in out
    ds, _ = preprocess(rows[:3], Pick(), tok, "chatml", 128, 11, False, tmp_path)
    trained = [tok.decode([t for t in labels if t != IGNORE_INDEX]) for labels in ds["labels"]]
    assert TRAINED.findall(out) == trained
    assert out.count("trained: ") == 3


def test_preview_examples_system_prompt_and_invalid_rows(tok):
    profile = PlainSFT.from_options({"system_prompt": "Date: {date}"}, today=dt.date(2025, 1, 2))
    out = preview_examples([conv("Q", "A", line=4)], profile, tok, "chatml", n=5, seed=0)
    assert "<|im_start|>system\nDate: 2025-01-02<|im_end|>" in out
    assert TRAINED.findall(out) == ["A<|im_end|>"]
    out = preview_examples([conv("Q", "bad", line=2)], Pick(), tok, "chatml", n=1, seed=0)
    assert "=== example 1 (line 2) ===\ndropped by the profile: messages[1].content: bad" in out
