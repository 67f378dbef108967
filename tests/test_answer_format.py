"""A profile's answer format: checked on training rows, held to in generation, scored."""

from __future__ import annotations

import json
import random

import pytest

from trainer_core import AnswerFormat, Profile, check_answer, hookimpl
from trainer_core.plugins.answer_format import FormatError

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"},
                                           "unit": {"enum": ["cm", "kg"]}},
          "required": ["answer", "unit"], "additionalProperties": False}


class JsonAnswer(Profile, name="json_answer", version="1",
                 description="Answers are one JSON object: an integer and a unit."):
    """The JSON-schema test profile: answers become ``{"answer": N, "unit": "cm"}``."""

    def transform(self, example, index, rng):
        out = json.loads(json.dumps(example))
        for m in out["messages"]:
            if m["role"] == "assistant" and not m["content"].startswith("{"):
                m["content"] = json.dumps({"answer": len(m["content"]), "unit": "cm"})
        return out

    def answer_format(self, example):
        return AnswerFormat.json_schema(SCHEMA)


class JsonPlugin:
    @hookimpl
    def register_profiles(self, register):
        register(JsonAnswer)


def test_check_answer_names_the_part_that_failed():
    fmt = AnswerFormat.regex("<<A>>[0-9]+<<B>>")
    assert check_answer(fmt, "<<A>>12<<B>>") == (True, "")
    assert check_answer(fmt, "<<A>>1x2<<B>>") == (False, "at char 6: 'x2<<B>>'")
    assert check_answer(fmt, "<<A>>12") == (False, "ends early after '<<A>>12'")
    emoji = AnswerFormat.regex("(?:🤔){2}\n[^🛑]*\n(?:🛑){2}")
    assert check_answer(emoji, "🤔🤔\nhi\n🛑🛑")[0]
    assert check_answer(emoji, "🤔🤔\nhi 🛑 no\n🛑🛑") == (False, "at char 6: '🛑 no\\n🛑🛑'")
    js = AnswerFormat.json_schema(json.dumps(SCHEMA))
    assert js == AnswerFormat.json_schema(SCHEMA)  # one value (and one compiled grammar)
    assert check_answer(js, '{"answer": 3, "unit": "kg"}')[0]
    assert not check_answer(js, '{"answer": 3.5, "unit": "kg"}')[0]
    lark = AnswerFormat.lark('start: "yes" | "no"')
    assert check_answer(lark, "no")[0] and not check_answer(lark, "maybe")[0]
    with pytest.raises(FormatError):
        check_answer(AnswerFormat.regex("(unclosed"), "x")
    with pytest.raises(ValueError):
        AnswerFormat.json_schema("[1, 2")


def test_a_row_that_breaks_its_format_is_rejected_with_file_line_and_turn(trainer_plugin,
                                                                         qwen_tokenizer,
                                                                         tmp_path):
    from trainer_core.data.preprocess import preprocess
    from trainer_core.data.rows import read_rows
    from trainer_core.errors import DataError

    trainer_plugin(JsonPlugin(), "json-answer-test")
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": "some words"}]} for i in range(4)]
    rows[2]["messages"][1]["content"] = '{"answer": 1, "unit": "miles"}'
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, _ = read_rows(str(path))
    profile = JsonAnswer.from_options({})
    kwargs = dict(tokenizer=qwen_tokenizer, template="chatml", max_length=256, seed=0,
                  cache_dir=tmp_path / "cache", source=str(path))
    with pytest.raises(DataError) as err:
        preprocess(data, profile, on_invalid="error", **kwargs)
    assert f"{path}:3: messages[1].content: does not match the answer format" in str(err.value)
    assert "at char 23: 'miles\"}'" in str(err.value)
    kept, stats = preprocess(data, profile, on_invalid="skip", **kwargs)
    assert len(kept) == 3 and stats.dropped == {"format_invalid": 1}


def _examples(profile, n, seed):
    """``n`` prompts prepared by ``profile`` (instructions drawn per row), with their formats."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        row = {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                            {"role": "assistant", "content": str(a + b)}]}
        ex = profile.prepare(row, i, random.Random(seed * 1000 + i))
        prompt = {**ex, "messages": ex["messages"][:-1]}
        out.append((prompt, profile.answer_format(prompt)))
    return out


def test_fuzz_strict_generation_always_matches_the_format(trainer_plugin, qwen_tokenizer,
                                                         tiny_qwen3):
    """200 prompts of three profiles through a random-weight model (it never answers in
    format by itself): every output matches its format, closings forced at short budgets,
    multi-token emojis included."""
    from trainer_core.data.chat import render_generation_prompt
    from trainer_core.generation import generate
    from trainer_core.plugins.registry import get_profile_class

    trainer_plugin(JsonPlugin(), "json-answer-test")
    emoji = get_profile_class("emoji_think").from_options(
        {"stop_emojis": ["⏹️", "🛡️", "🛑"], "think_min": 1, "think_max": 4})
    profiles = [emoji, get_profile_class("regime3").from_options({"system_prompt": ""}),
                JsonAnswer.from_options({})]
    rng = random.Random(7)
    checked = forced = 0
    for k, count in enumerate((80, 60, 60)):
        rows = _examples(profiles[k], count, seed=k)
        assert all(fmt is not None for _, fmt in rows)
        for start in range(0, count, 20):
            batch = rows[start:start + 20]
            budget = rng.choice((14, 20, 28))
            texts = [render_generation_prompt(p["messages"], "chatml", qwen_tokenizer)
                     for p, _ in batch]
            outputs = generate(tiny_qwen3, qwen_tokenizer, texts, [], budget,
                               formats=[f for _, f in batch])
            for (_, fmt), out in zip(batch, outputs, strict=True):
                ok, failed = check_answer(fmt, out)
                assert ok, (fmt.describe(), out, failed)
                n_tokens = len(qwen_tokenizer(out, add_special_tokens=False)["input_ids"])
                forced += n_tokens >= budget - 1
                checked += 1
    assert checked == 200
    assert forced > 50  # most rows ran into the budget and were closed


def test_a_closing_longer_than_the_usual_reserve_is_forced_in_time(qwen_tokenizer,
                                                                   tiny_qwen3):
    """A format whose required ending is ~30 tokens (more than the 16 steps in which closings
    are usually checked, like a run of emojis that are several tokens each): strict rows
    still end in format at a 48-token limit, however the random model would go on."""
    from trainer_core.generate.formats import CLOSING_RESERVE
    from trainer_core.generation import generate

    ending = "".join(f" <<{word}>>" for word in ("one", "two", "three", "four", "five",
                                                  "six", "seven", "eight", "nine",
                                                  "ten"))
    fmt = AnswerFormat.regex("[a-z ]*" + ending)  # no regex metacharacters in the ending
    assert len(qwen_tokenizer(ending, add_special_tokens=False)["input_ids"]) > \
        CLOSING_RESERVE + 8
    prompts = [f"<|im_start|>user\nSay something, {i}.<|im_end|>\n<|im_start|>assistant\n"
               for i in range(6)]
    outputs = generate(tiny_qwen3, qwen_tokenizer, prompts, [], 48, formats=[fmt] * 6)
    for out in outputs:
        ok, failed = check_answer(fmt, out)
        assert ok, (out, failed)
        assert out.endswith(ending)
