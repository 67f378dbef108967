"""Preprocessing: transform + validate + encode + filter, the on-disk cache and determinism."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import attrs
import pytest

from trainer_core.data.chat import IGNORE_INDEX, encode
from trainer_core.data.preprocess import (
    PreprocessStats,
    default_cache_dir,
    derive_seed,
    preprocess,
)
from trainer_core.data.rows import read_rows
from trainer_core.data.tokenizer import end_of_turn_id, load_tokenizer
from trainer_core.errors import UserError
from trainer_core.plugins.profile import PlainSFT, Profile

CHATML_JINJA = str(Path(__file__).parent / "data" / "chatml.jinja")
DAY = dt.date(2024, 5, 1)
CALLS: list[tuple[int, float]] = []  # (index, first rng draw) of every transform call


@attrs.define(frozen=True)
class CountingOptions:
    suffix: str = ""


@attrs.define(frozen=True)
class Counting(Profile):
    """Records each call and the first draw of its rng; appends a random digit to answers."""

    name: ClassVar[str] = "counting_test"
    version: ClassVar[str] = "1"
    Options: ClassVar[type] = CountingOptions
    options: CountingOptions = attrs.field(factory=CountingOptions, kw_only=True)

    def transform(self, example, index, rng):
        draw = rng.random()
        CALLS.append((index, draw))
        out = super().transform(example, index, rng)
        last = out["messages"][-1]
        last["content"] += self.options.suffix + f" #{int(draw * 10)}"
        return out

    def validate(self, example):
        text = example["messages"][-1]["content"]
        return ["messages[-1].content: contains FORBIDDEN"] if "FORBIDDEN" in text else []


def make(suffix: str = "", today: dt.date = DAY) -> Counting:
    return Counting.from_options({"suffix": suffix}, today=today)


def row(q: str, a: str, line: int = 1) -> dict:
    return {
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        "_line": line,
    }


ROWS = [row(f"question {i}", f"answer {i}", i + 1) for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.clear()


def run(tok, cache, rows=ROWS, profile=None, **kw):
    args = dict(template="chatml", max_length=256, seed=1, truncation=False)
    args.update(kw)
    return preprocess(rows, profile or make(), tok, cache_dir=cache, **args)


def test_features_labels_and_stats(tok, tmp_path):
    ds, stats = run(tok, tmp_path)
    assert ds.column_names == ["input_ids", "labels", "length", "num_trained", "line"]
    assert stats.rows_in == stats.rows_kept == len(ds) == 6 and stats.dropped == {}
    assert ds["line"] == [1, 2, 3, 4, 5, 6]
    first = ds[0]
    expected = encode(
        [{"role": "user", "content": "question 0"},
         {"role": "assistant", "content": f"answer 0 #{int(CALLS[0][1] * 10)}"}],
        tok,
    )
    assert first["input_ids"] == expected.input_ids and first["labels"] == expected.labels
    trained = [t for t in first["labels"] if t != IGNORE_INDEX]
    assert tok.decode(trained) == f"answer 0 #{int(CALLS[0][1] * 10)}<|im_end|>"
    assert stats.total_tokens == sum(ds["length"]) == sum(len(x) for x in ds["input_ids"])
    assert stats.trained_tokens == sum(ds["num_trained"])
    assert stats.trained_tokens == sum(sum(t != IGNORE_INDEX for t in x) for x in ds["labels"])


def test_second_identical_call_is_a_cache_hit_without_transform(tok, tmp_path):
    ds1, s1 = run(tok, tmp_path)
    assert not s1.cache_hit and len(CALLS) == 6
    ds2, s2 = run(tok, tmp_path)
    assert s2.cache_hit and len(CALLS) == 6  # transform not called again
    assert ds2.to_dict() == ds1.to_dict()
    assert attrs.evolve(s2, cache_hit=False) == s1
    assert [p.name for p in tmp_path.iterdir()] == [s1.cache_key]  # no temp dirs left behind


@pytest.mark.parametrize(
    "change",
    [
        {"rows": [*ROWS[:-1], row("question 5", "answer CHANGED", 6)]},
        {"profile": make(suffix="!")},
        {"profile": make(today=dt.date(2024, 5, 2))},
        {"max_length": 255},
        {"template": CHATML_JINJA},
        {"seed": 2},
        {"truncation": True},
    ],
    ids=["rows", "options", "today", "max_length", "template", "seed", "truncation"],
)
def test_any_input_change_invalidates(tok, tmp_path, change):
    _, base = run(tok, tmp_path)
    CALLS.clear()
    _, changed = run(tok, tmp_path, **change)
    assert not changed.cache_hit and len(CALLS) == 6
    assert changed.cache_key != base.cache_key
    _, again = run(tok, tmp_path, **change)
    assert again.cache_hit and len(CALLS) == 6


def test_file_content_change_invalidates(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    cache = tmp_path / "cache"
    lines = [json.dumps({"messages": r["messages"]}) for r in ROWS]
    path.write_text("\n".join(lines) + "\n")
    rows, _ = read_rows(str(path))
    assert not run(tok, cache, rows)[1].cache_hit
    assert run(tok, cache, read_rows(str(path))[0])[1].cache_hit
    path.write_text("\n".join(lines[:-1] + [lines[-1].replace("answer", "reply")]) + "\n")
    CALLS.clear()
    _, stats = run(tok, cache, read_rows(str(path))[0])
    assert not stats.cache_hit and len(CALLS) == 6


def test_default_cache_dir_and_damaged_entry(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "tc"))
    assert default_cache_dir() == tmp_path / "tc" / "preprocess"
    _, stats = preprocess(ROWS, make(), tok, "chatml", 256, 1, False, None)
    entry = tmp_path / "tc" / "preprocess" / stats.cache_key
    assert (entry / "stats.json").is_file()
    arrays = list(entry.glob("*.npy"))
    assert arrays
    for array in arrays:
        array.write_bytes(b"garbage")
    CALLS.clear()
    ds, again = preprocess(ROWS, make(), tok, "chatml", 256, 1, False, None)
    assert not again.cache_hit and len(CALLS) == 6 and len(ds) == 6  # rebuilt, not fatal
    assert preprocess(ROWS, make(), tok, "chatml", 256, 1, False, None)[1].cache_hit


def test_too_long_rows_are_dropped_and_counted(tok, tmp_path):
    rows = [row("short", "ok", 1), row("long " * 200, "ok", 2), row("short", "fine", 3)]
    ds, stats = run(tok, tmp_path, rows=rows, max_length=64)
    assert stats.dropped == {"too_long": 1} and stats.rows_kept == 2
    assert ds["line"] == [1, 3] and max(ds["length"]) <= 64


def test_truncation_keeps_final_end_of_turn_token(tok, tmp_path):
    conv = {
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "q2 " * 100},
            {"role": "assistant", "content": "second answer"},
        ],
        "_line": 1,
    }
    ds, stats = run(tok, tmp_path, rows=[conv], max_length=64, truncation=True)
    assert stats.truncated == 1 and stats.rows_kept == 1 and stats.dropped == {}
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    im_end = end_of_turn_id(tok)
    assert len(ids) <= 64 and ids[-1] == im_end and labels[-1] == im_end
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]).startswith("first answer")
    # Without opting in the same row is dropped; with a first turn too long it is dropped too.
    assert run(tok, tmp_path, rows=[conv], max_length=64)[1].dropped == {"too_long": 1}
    long_first = row("q " * 100, "a", 1)
    _, stats = run(tok, tmp_path, rows=[long_first], max_length=64, truncation=True)
    assert stats.dropped == {"too_long": 1} and stats.truncated == 0


def test_profile_validate_problems_drop_rows(tok, tmp_path):
    rows = [row("q", "fine", 3), row("q", "FORBIDDEN", 9)]
    ds, stats = run(tok, tmp_path, rows=rows, source="train.jsonl")
    assert stats.dropped == {"profile_invalid": 1} and len(ds) == 1
    assert stats.problems == ["train.jsonl:9: messages[-1].content: contains FORBIDDEN"]


def test_transform_rng_is_per_seed_and_index_and_global_random_untouched(tok, tmp_path):
    random.seed(99)
    state = random.getstate()
    run(tok, tmp_path, seed=5)
    assert random.getstate() == state
    expected = [(i, random.Random(derive_seed(5, i)).random()) for i in range(6)]
    assert CALLS == expected
    CALLS.clear()
    run(tok, tmp_path, seed=5, use_cache=False)
    assert CALLS == expected  # same seed, same draws
    CALLS.clear()
    run(tok, tmp_path, seed=6, use_cache=False)
    assert [d for _, d in CALLS] != [d for _, d in expected]
    assert len({derive_seed(5, i) for i in range(1000)}) == 1000


def test_derive_seed_is_stable_across_processes():
    code = "from trainer_core.data.preprocess import derive_seed; print(derive_seed(42, 7))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outs == {str(derive_seed(42, 7))}


def test_transform_errors_name_the_row(tok, tmp_path):
    @attrs.define(frozen=True)
    class Broken(Profile):
        name: ClassVar[str] = "broken_test"

        def transform(self, example, index, rng):
            raise KeyError("boom")

    with pytest.raises(UserError, match=r"train.jsonl:4: profile 'broken_test' failed"):
        preprocess([row("q", "a", 4)], Broken(), tok, "chatml", 64, 1, False, tmp_path,
                   source="train.jsonl")


def test_plain_sft_system_prompt_is_masked(tok, tmp_path):
    profile = PlainSFT.from_options({"system_prompt": "Today is {date}."}, today=DAY)
    ds, stats = preprocess(ROWS[:1], profile, tok, "chatml", 256, 1, False, tmp_path)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert "Today is 2024-05-01." in tok.decode(ids)
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "answer 0<|im_end|>"
    assert isinstance(stats, PreprocessStats) and stats.to_dict()["rows_kept"] == 1
