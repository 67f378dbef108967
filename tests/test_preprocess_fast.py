"""The batched preprocessing path gives exactly what the per-row reference path gives.

Reference: for each row, ``profile.prepare`` (system prompt, then ``transform``) with the row's
RNG, ``validate``, the special-token check, then
``chat.encode`` (one tokenizer call per row, labels from that row's offsets), then the too-long /
no-trained-token filters. The fast path renders rows one by one but tokenizes them many per call
and labels them with array operations, in one or several processes; its ``input_ids`` and
``labels`` must be identical, row for row.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import unicodedata

import numpy as np
import pytest

from trainer_core.data.chat import IGNORE_INDEX, encode, resolve_template, truncate
from trainer_core.data.preprocess import (
    Tokenized,
    _control_tokens,
    _fast_backend,
    _Job,
    _tokenize,
    example_rng,
    preprocess,
)
from trainer_core.data.rows import LINE_KEY, example_of, example_problems
from trainer_core.data.tokenizer import bundled_tokenizer_dir, load_tokenizer, special_token_texts
from trainer_core.data.words import WordEncoder
from trainer_core.errors import DataError, UserError
from trainer_core.plugins.profile import PlainSFT
from trainer_core.plugins.registry import get_profile_class

DATA = Path(__file__).parent / "data"
DAY = dt.date(2024, 5, 1)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def tok_extra():
    """A Qwen3 tokenizer that also knows the Llama-3 markers as special tokens and adds a BOS
    token unless told not to (as such models' tokenizers do)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()), local_files_only=True)
    t.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    t.bos_token = "<|endoftext|>"
    t.add_bos_token = True
    return t


@pytest.fixture(scope="module")
def rows(sample_rows):
    out = []
    for i, r in enumerate(sample_rows[:120]):
        row = dict(r, **{LINE_KEY: i + 1})
        if i % 7 == 3:  # some rows whose text needs care: emoji split into several tokens,
            # leading whitespace and newlines at the span edges, non-ASCII
            row["messages"] = [*row["messages"][:-1], {
                "role": "assistant", "content": "\n\n 🫠🦜 café  \n" + row["messages"][-1]["content"]}]
        if i % 11 == 5:  # not in NFC: the tokenizer's normalizer composes it, offsets map back
            msgs = [dict(m) for m in row["messages"]]
            first_user = next(m for m in msgs if m["role"] == "user")
            first_user["content"] = "cafe\u0301? " + first_user["content"]
            row["messages"] = msgs
        out.append(row)
    return out


def profiles():
    emoji = get_profile_class("emoji_think")
    return {
        "plain_sft": PlainSFT.from_options({"system_prompt": "Today is {date}."}, today=DAY),
        "emoji_think": emoji.from_options({}, today=DAY),
    }


def reference(rows, profile, tokenizer, template, max_length, seed, truncation=False):
    """The per-row path, written out: what preprocessing meant before it was batched."""
    tpl = resolve_template(template, tokenizer)
    out = []
    for index, row in enumerate(rows):
        example = profile.prepare(example_of(row), index, example_rng(seed, index))
        if example_problems(example) or list(profile.validate(example)):
            continue
        if _control_tokens(example["messages"], special_token_texts(tokenizer)):
            continue
        enc = encode(example["messages"], tokenizer, tpl)
        if enc.length > max_length:
            enc = truncate(enc, max_length) if truncation else None
            if enc is None:
                continue
        if enc.num_trained == 0:
            continue
        out.append((enc.input_ids, enc.labels, row[LINE_KEY]))
    return out


def as_tuples(ds: Tokenized):
    return [(ds.ids(i), ds.labels(i), int(ds.line[i])) for i in range(len(ds))]


@pytest.mark.parametrize("profile_name", ["plain_sft", "emoji_think"])
@pytest.mark.parametrize("template", ["chatml", "tokenizer", str(DATA / "chatml.jinja")],
                         ids=["chatml", "tokenizer", "jinja_file"])
def test_batched_path_equals_per_row_path(tok, rows, tmp_path, profile_name, template):
    profile = profiles()[profile_name]
    expected = reference(rows, profile, tok, template, 2048, 7)
    assert len(expected) > 100
    ds, stats = preprocess(rows, profile, tok, template, 2048, 7, False, tmp_path, workers=1)
    assert as_tuples(ds) == expected
    assert stats.total_tokens == sum(len(e[0]) for e in expected)
    assert stats.trained_tokens == sum(sum(t != IGNORE_INDEX for t in e[1]) for e in expected)
    # Several processes (forked workers, contiguous chunks) and the cache give the same bytes.
    many, _ = preprocess(rows, profile, tok, template, 2048, 7, False, use_cache=False, workers=2)
    cached, hit = preprocess(rows, profile, tok, template, 2048, 7, False, tmp_path)
    assert hit.cache_hit
    for other in (many, cached):
        for name in ("input_ids", "trained", "offsets", "num_trained", "line"):
            assert np.asarray(getattr(other, name)).tobytes() == getattr(ds, name).tobytes(), name


@pytest.mark.parametrize("template", ["llama3_like.jinja", "gemma_like.jinja"])
def test_tokenizer_that_adds_bos_and_knows_extra_markers(tok_extra, rows, template):
    """add_special_tokens=False must hold on the batched path too (no BOS sneaks in)."""
    profile = profiles()["plain_sft"]
    path = str(DATA / template)
    expected = reference(rows[:40], profile, tok_extra, path, 2048, 3)
    ds, _ = preprocess(rows[:40], profile, tok_extra, path, 2048, 3, False, use_cache=False)
    assert as_tuples(ds) == expected and len(expected) == 40
    # Whatever BOS there is the template wrote; none was added in front of it.
    assert all(ids[:2].count(tok_extra.bos_token_id) <= 1 for ids, _, _ in expected)


def test_truncation_and_length_filters_match(tok, rows):
    profile = profiles()["emoji_think"]
    expected = reference(rows, profile, tok, "chatml", 96, 5, truncation=True)
    ds, stats = preprocess(rows, profile, tok, "chatml", 96, 5, True, use_cache=False, workers=2)
    assert as_tuples(ds) == expected
    assert stats.truncated > 0 and stats.rows_kept == len(expected)
    dropped = reference(rows, profile, tok, "chatml", 96, 5)
    ds, stats = preprocess(rows, profile, tok, "chatml", 96, 5, False, use_cache=False)
    assert as_tuples(ds) == dropped and stats.dropped["too_long"] == len(rows) - len(dropped)


class _SlowOnly:
    """A tokenizer without a Rust backend: preprocessing must take the per-row path."""

    _tokenizer = None

    def __init__(self, inner):
        self._inner = inner

    def __call__(self, *args, **kwargs):
        return self._inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_tokenizer_without_fast_backend_takes_per_row_path(tok, rows):
    slow = _SlowOnly(tok)
    assert _fast_backend(slow) is None and _fast_backend(tok) is not None
    profile = profiles()["plain_sft"]
    ds, _ = preprocess(rows[:20], profile, slow, "chatml", 2048, 1, False, use_cache=False)
    assert as_tuples(ds) == reference(rows[:20], profile, tok, "chatml", 2048, 1)


def test_errors_and_problems_are_reported_in_row_order_with_workers(tok, rows):
    """Each worker stops at its chunk's first error; the parent raises the earliest row's, and
    profile problems are listed in row order."""
    marked = [dict(r) for r in rows]
    for i in (100, 90, 30, 10):
        marked[i]["messages"] = [*marked[i]["messages"][:-1],
                                 {"role": "assistant", "content": "REJECT" if i < 50 else "EXPLODE"}]
    ds, stats = preprocess(marked, _Picky(), tok, "chatml", 2048, 1, False, use_cache=False,
                           workers=3)
    assert stats.problems == ["data:11: messages[-1]: rejected", "data:31: messages[-1]: rejected"]
    assert stats.dropped == {"profile_invalid": 2} and len(ds) == len(rows) - 2
    with pytest.raises(UserError, match=r"^data:91: boom$"):
        preprocess(marked, _Picky(explode=True), tok, "chatml", 2048, 1, False, use_cache=False,
                   workers=3)


class _Picky(PlainSFT):
    name = "picky_test"

    def __init__(self, explode=False):
        super().__init__()
        object.__setattr__(self, "explode", explode)

    def transform(self, example, index, rng):
        if self.explode and example["messages"][-1]["content"] == "EXPLODE":
            raise UserError("boom")
        return super().transform(example, index, rng)

    def validate(self, example):
        return ["messages[-1]: rejected"] if example["messages"][-1]["content"] == "REJECT" else []


def test_examples_view_and_damaged_arrays(tok, rows, tmp_path):
    profile = profiles()["plain_sft"]
    ds, stats = preprocess(rows, profile, tok, "chatml", 2048, 1, False, tmp_path)
    view = ds.examples()
    assert len(view) == len(ds) == stats.rows_kept
    assert view[-1] == {"input_ids": ds.ids(len(ds) - 1), "labels": ds.labels(len(ds) - 1)}
    assert view[1:3] == [view[1], view[2]]
    assert ds[0]["length"] == len(view[0]["input_ids"]) and ds["line"][:2] == [1, 2]
    # A cut-off array (valid header, missing data) is found and the entry rebuilt.
    ids_file = tmp_path / stats.cache_key / "input_ids.npy"
    ids_file.write_bytes(ids_file.read_bytes()[:-40])
    again, s2 = preprocess(rows, profile, tok, "chatml", 2048, 1, False, tmp_path)
    assert not s2.cache_hit and as_tuples(again) == as_tuples(ds)


def test_nothing_kept_round_trips_through_the_cache(tok, rows, tmp_path):
    profile = profiles()["plain_sft"]
    empty, stats = preprocess([], profile, tok, "chatml", 4, 1, False, use_cache=False, workers=2)
    assert len(empty) == 0 and stats.rows_in == 0
    ds, stats = preprocess(rows[:5], profile, tok, "chatml", 4, 1, False, tmp_path, workers=2)
    assert len(ds) == 0 and stats.dropped == {"too_long": 5} and ds.to_dict()["line"] == []
    again, hit = preprocess(rows[:5], profile, tok, "chatml", 4, 1, False, tmp_path)
    assert hit.cache_hit and len(again) == 0 and len(again.examples()) == 0


def test_invalid_row_policies_are_the_same_with_workers_and_from_the_cache(tok, rows, tmp_path):
    """Profile rejections and control tokens in content follow on_invalid and
    special_tokens_in_content exactly as in one process: same drops, same first problems in
    row order (profile problems, then control-token hits), same errors; a cached result
    gives the same stats and the same on_invalid=error refusal."""
    marked = [dict(r) for r in rows]
    for i in (10, 30):
        marked[i]["messages"] = [*marked[i]["messages"][:-1],
                                 {"role": "assistant", "content": "REJECT"}]
    smuggling = [i for i in range(2, 120, 4) if i not in (10, 30)]  # 28 rows, every chunk
    for i in smuggling:
        msgs = [dict(m) for m in marked[i]["messages"]]
        msgs[-1]["content"] = "ok<|im_end|> and a fake turn"
        marked[i]["messages"] = msgs
    runs = [preprocess(marked, _Picky(), tok, "chatml", 2048, 1, False, use_cache=False,
                       workers=w) for w in (1, 3)]
    (one, s1), (many, s3) = runs
    assert s1.dropped == s3.dropped == {"profile_invalid": 2, "special_token": len(smuggling)}
    assert s1.problems == s3.problems and len(s3.problems) == 20
    assert s3.problems[:3] == ["data:11: messages[-1]: rejected",
                               "data:31: messages[-1]: rejected",
                               f"data:{smuggling[0] + 1}: messages[1].content: contains the "
                               "control token '<|im_end|>'"]
    assert as_tuples(one) == as_tuples(many)
    # allow: the same rows are tokenized with real control tokens instead.
    _, allowed = preprocess(marked, _Picky(), tok, "chatml", 2048, 1, False, use_cache=False,
                            workers=3, special_tokens="allow")
    assert allowed.dropped == {"profile_invalid": 2}
    # on_invalid=error: the control-token error lists the first 20 hits in row order.
    errors = []
    for w in (1, 3):
        with pytest.raises(DataError) as info:
            preprocess(marked, _Picky(), tok, "chatml", 2048, 1, False, use_cache=False,
                       workers=w, on_invalid="error")
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    lines = errors[0].splitlines()
    assert lines[0].startswith(f"data: {len(smuggling)} row(s) contain the tokenizer's control")
    assert lines[1].startswith(f"data:{smuggling[0] + 1}: messages[1].content")
    assert len(lines) == 22 and lines[-1] == f"... and {len(smuggling) - 20} more"
    # Rejections alone under on_invalid=error: refused cold and again from the cache.
    clean = [dict(r) for r in rows]
    clean[30] = marked[30]
    for _ in range(2):
        with pytest.raises(DataError, match=r"1 row rejected by profile 'picky_test'"):
            preprocess(clean, _Picky(), tok, "chatml", 2048, 1, False, tmp_path, workers=3,
                       on_invalid="error")
    cold, c1 = preprocess(clean, _Picky(), tok, "chatml", 2048, 1, False, tmp_path, workers=3)
    warm, c2 = preprocess(clean, _Picky(), tok, "chatml", 2048, 1, False, tmp_path)
    assert not c1.cache_hit and c2.cache_hit and as_tuples(cold) == as_tuples(warm)
    assert {k: v for k, v in c1.to_dict().items() if k != "cache_hit"} == \
        {k: v for k, v in c2.to_dict().items() if k != "cache_hit"}


# ------------------------------------------------------------------ the word cache

#: Pieces of adversarial text: whitespace runs of every kind, CRLF, contractions in both
#: cases, letters whose case folds to ASCII (long s, Kelvin sign), combining marks (not in NFC
#: after a base letter), CJK, Hangul, emoji with modifiers and joiners, control and separator
#: characters, and the tokenizer's added tokens (special and not).
ALPHABET = [*"ab Z9 \n\r\t'sStT!?.,-_()[]{}<>|é日本語한국어🎉👍🏽", "\u0301", "\u00a0", "\u2003",
            "\u3000", "\u200b", "\u200d", "\x1c", "\x1f", "\x85", "\u2028", "\x00", "ſ", "\u212a",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "'re", "'LL",
            "'S", "  ", "\n\n", "\r\n", "1234", "ﬅ", "Ⅻ", "٣", "ǅ"]


def random_texts(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 50))) for _ in range(n)]


def backend_encode(backend, texts):
    encs = backend.encode_batch(texts, add_special_tokens=False)
    ids = [i for e in encs for i in e.ids]
    offsets = [o for e in encs for o in e.offsets]
    return ids, offsets, [len(e) for e in encs]


@pytest.fixture(scope="module")
def backend(tok):
    from tokenizers import Tokenizer

    # A private copy: the tests switch its normalizer off and on.
    return Tokenizer.from_str(_fast_backend(tok).to_str())


def test_word_cache_gives_the_tokenizer_own_ids_and_offsets(backend):
    words = WordEncoder.for_backend(backend)
    assert words is not None and not words.unsafe
    rng = random.Random(12)
    done_texts = 0
    for _ in range(150):
        texts = random_texts(rng, 8)
        ids, offsets, lengths, done = words.encode(texts)
        kept = [t for t, d in zip(texts, done, strict=True) if d]
        want = backend_encode(backend, kept)
        assert ids.tolist() == want[0]
        assert [tuple(o) for o in offsets.tolist()] == want[1]
        assert lengths[done].tolist() == want[2] and not lengths[~done].any()
        done_texts += len(kept)
        # Texts not in NFC are left to the tokenizer (its normalizer moves offsets).
        assert all(d or not unicodedata.is_normalized("NFC", t) for t, d in zip(texts, done, strict=True))
    assert done_texts > 600  # most texts took the word path


@pytest.mark.parametrize("normalizer", [True, False], ids=["nfc", "normalizer_off"])
def test_tokenize_mixes_word_cache_and_tokenizer_in_text_order(backend, normalizer):
    nfc = backend.normalizer
    words = WordEncoder.for_backend(backend)
    # A character the word path must not take (as if a probe had disagreed on it).
    words.safe.discard("é")
    words.unsafe.add("é")
    job = _Job([], None, None, None, 0, 0, False, "t", backend=backend, words=words, nfc=nfc)
    rng = random.Random(5)
    try:
        if not normalizer:
            backend.normalizer = None
        for _ in range(40):
            texts = [t or "x" for t in random_texts(rng, 12)]
            if not normalizer:  # only NFC text reaches a worker without its normalizer
                texts = [unicodedata.normalize("NFC", t) for t in texts]
            ids, offs, lengths = _tokenize(job, texts)
            want_ids, want_offs, want_lengths = backend_encode(backend, texts)
            base = np.repeat(np.cumsum([0] + [len(t) for t in texts[:-1]]), want_lengths)
            assert ids.tolist() == want_ids and lengths.tolist() == want_lengths
            assert (offs - base[:, None]).tolist() == [list(o) for o in want_offs]
    finally:
        backend.normalizer = nfc


def _edited(backend, edit):
    from tokenizers import Tokenizer

    state = json.loads(backend.to_str())
    edit(state)
    return Tokenizer.from_str(json.dumps(state))


def _gpt2_style(state):
    state["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False,
                              "trim_offsets": True, "use_regex": True}


def _stripping_added_token(state):
    state["added_tokens"][-1]["lstrip"] = True


def _other_normalizer(state):
    state["normalizer"] = {"type": "NFKC"}


@pytest.mark.parametrize("edit", [_gpt2_style, _stripping_added_token, _other_normalizer],
                         ids=["gpt2_style", "stripping_added_token", "nfkc"])
def test_word_cache_declines_tokenizers_of_another_shape(backend, edit):
    assert WordEncoder.for_backend(_edited(backend, edit)) is None


def test_word_cache_declines_spelled_out_special_tokens(backend):
    from tokenizers import Tokenizer

    spelled = Tokenizer.from_str(backend.to_str())
    spelled.encode_special_tokens = True
    assert WordEncoder.for_backend(spelled) is None


def test_word_cache_leaves_words_the_tokenizer_splits_further(backend):
    words = WordEncoder.for_backend(backend)
    assert words._add_words(["hello", " world"]) == set()
    # "a b" is two words to the tokenizer: cached as one it would be wrong.
    assert words._add_words(["a b"]) == {"a b"} and "a b" not in words.index
