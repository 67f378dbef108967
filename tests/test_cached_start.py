"""A second run on the same data is ready fast: the rows cache, the lazy tokenizer and the
preprocessing key built from them, and every change that must still miss the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from trainer_core.config import load_config
from trainer_core.data import tokenizer as tokmod
from trainer_core.data.rows import Rows, read_rows, read_rows_cached, split_rows
from trainer_core.data.tokenizer import (
    FACT_ATTRS,
    FACT_TOKENS,
    LazyTokenizer,
    bundled_tokenizer_dir,
    load_tokenizer,
    materialized,
    tokenizer_fingerprint,
)
from trainer_core.plugins.registry import build_profile
from trainer_core.train.inputs import load_rows, prepare_examples

BOM = b"\xef\xbb\xbf"


def chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q},
                                    {"role": "assistant", "content": a}]}, ensure_ascii=False)


def write_data(path: Path, n: int = 40, answer: str = "answer") -> Path:
    lines = [chat(f"question {i} café", f"{answer} {i}") for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def messy_file(path: Path) -> Path:
    """BOM, CRLF, blank lines, invalid rows and prompt/completion rows."""
    lines = [BOM + chat("first", "one").encode(),
             b"",
             b"{not json",
             chat("second ☃", "two 🎉").encode(),
             json.dumps({"prompt": "p", "completion": "c", "metadata": {"k": 1}}).encode(),
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
             b"\xff\xfe bad utf8",
             b"   ",
             chat("last", "three").encode()]
    path.write_bytes(b"\r\n".join(lines[:5]) + b"\n" + b"\n".join(lines[5:]))
    return path


def test_rows_cache_reads_back_the_same_rows_and_problems(tmp_path):
    path = messy_file(tmp_path / "d.jsonl")
    cache = tmp_path / "cache"
    plain_rows, plain_problems = read_rows(str(path))
    first, p1 = read_rows_cached(str(path), cache)
    second, p2 = read_rows_cached(str(path), cache)
    uncached, p3 = read_rows_cached(str(path), None)
    assert isinstance(second, Rows) and second._items is None  # parsed from the file on demand
    assert list(first) == list(second) == list(uncached) == plain_rows and len(plain_rows) == 4
    assert second[-1] == plain_rows[-1] and second[1:3] == plain_rows[1:3]
    assert [str(p) for p in p1] == [str(p) for p in p2] == [str(p) for p in p3] \
        == [str(p) for p in plain_problems] and len(plain_problems) == 3
    assert first.digest == second.digest == uncached.digest
    assert len(list(cache.glob("rows-*.bin"))) == 1
    # The same bytes under another name: problems name the file read now.
    other = tmp_path / "other.jsonl"
    shutil.copyfile(path, other)
    rows, problems = read_rows_cached(str(other), cache)
    assert rows.digest == first.digest and all(str(p).startswith(str(other)) for p in problems)


def test_rows_cache_misses_when_bytes_change_even_with_same_size_and_mtime(tmp_path):
    path = write_data(tmp_path / "d.jsonl")
    cache = tmp_path / "cache"
    rows, _ = read_rows_cached(str(path), cache)
    st = path.stat()
    path.write_text(path.read_text().replace("answer 7", "answeR 7"), encoding="utf-8")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    changed, _ = read_rows_cached(str(path), cache)
    assert changed.digest != rows.digest
    assert changed[7]["messages"][1]["content"] == "answeR 7"
    again, _ = read_rows_cached(str(path), cache)
    assert again._items is None and again[7] == changed[7]


def test_damaged_rows_entry_is_rebuilt(tmp_path):
    path = write_data(tmp_path / "d.jsonl")
    cache = tmp_path / "cache"
    rows, _ = read_rows_cached(str(path), cache)
    (entry,) = cache.glob("rows-*.bin")
    entry.write_bytes(entry.read_bytes()[:-5])
    again, _ = read_rows_cached(str(path), cache)
    assert again._items is not None and list(again) == list(rows)  # parsed again
    assert read_rows_cached(str(path), cache)[0]._items is None  # and stored again


def test_split_parts_have_their_own_stable_identity(tmp_path):
    path = write_data(tmp_path / "d.jsonl")
    cache = tmp_path / "cache"
    plain, _ = read_rows(str(path))
    in_memory, _ = read_rows_cached(str(path), cache)
    lazy, _ = read_rows_cached(str(path), cache)
    expect = split_rows(plain, 0.2, 3)
    parts = [split_rows(in_memory, 0.2, 3), split_rows(lazy, 0.2, 3)]
    for train, val in parts:
        assert isinstance(train, Rows) and isinstance(val, Rows)
        assert list(train) == expect[0] and list(val) == expect[1]
    assert parts[0][0].digest == parts[1][0].digest != parts[0][1].digest
    assert split_rows(lazy, 0.2, 4)[0].digest != parts[0][0].digest
    # A part of a part (indices into indices) still reads the right rows.
    assert list(parts[1][0].select([2, 0])) == [expect[0][2], expect[0][0]]


@pytest.fixture
def tok_dir(tmp_path):
    """A copy of the bundled tokenizer that a test may change."""
    out = tmp_path / "tok"
    shutil.copytree(bundled_tokenizer_dir(), out)
    return out


@pytest.fixture
def fresh_tokenizers(monkeypatch, tmp_path):
    """No tokenizer loaded in this process yet, and an empty facts cache."""
    monkeypatch.setattr(tokmod, "_cache", {})
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "tc"))
    return tmp_path / "tc" / "tokenizers"


def facts_files(folder: Path) -> list[Path]:
    return [p for p in folder.glob("*.json") if not p.name.startswith("backend-")]


def test_lazy_tokenizer_answers_like_the_loaded_one(tok_dir, fresh_tokenizers, monkeypatch):
    first = load_tokenizer(str(tok_dir))
    assert first.loaded and len(facts_files(fresh_tokenizers)) == 1
    real = materialized(first)
    monkeypatch.setattr(tokmod, "_cache", {})
    lazy = load_tokenizer(str(tok_dir))
    assert isinstance(lazy, LazyTokenizer) and not lazy.loaded
    assert len(lazy) == len(real) and tokenizer_fingerprint(lazy) == tokenizer_fingerprint(real)
    for name in FACT_ATTRS:
        assert getattr(lazy, name) == getattr(real, name), name
    for token in FACT_TOKENS:
        assert lazy.convert_tokens_to_ids(token) == real.convert_tokens_to_ids(token)
    tokmod.check_tokenizer(lazy, 151_936, chatml=True)
    assert not lazy.loaded
    # Anything else loads it, and then it is the tokenizer.
    assert lazy("hello world", add_special_tokens=False)["input_ids"] \
        == real("hello world", add_special_tokens=False)["input_ids"]
    assert lazy.loaded and type(materialized(lazy)) is type(real)
    assert lazy.get_vocab() == real.get_vocab()
    assert tokenizer_fingerprint(lazy) == tokenizer_fingerprint(real)


@pytest.mark.parametrize("change", ["tokenizer_config", "new_file", "vocab"])
def test_changed_tokenizer_files_give_new_facts(tok_dir, fresh_tokenizers, monkeypatch, change):
    base = tokenizer_fingerprint(load_tokenizer(str(tok_dir)))
    config = tok_dir / "tokenizer_config.json"
    if change == "tokenizer_config":
        data = json.loads(config.read_text(encoding="utf-8"))
        data["chat_template"] = "{{ messages }}"
        config.write_text(json.dumps(data), encoding="utf-8")
    elif change == "new_file":
        (tok_dir / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    else:  # one added token more
        data = json.loads(config.read_text(encoding="utf-8"))
        data.setdefault("added_tokens_decoder", {})["151669"] = {
            "content": "<extra>", "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
        config.write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setattr(tokmod, "_cache", {})
    changed = load_tokenizer(str(tok_dir))
    assert changed.loaded  # new files: loaded, not answered from the old facts
    assert tokenizer_fingerprint(changed) != base
    assert len(facts_files(fresh_tokenizers)) == 2


def test_weights_in_a_model_directory_are_not_hashed(tok_dir, fresh_tokenizers, monkeypatch):
    load_tokenizer(str(tok_dir))
    (tok_dir / "model.safetensors").write_bytes(b"weights that changed")
    monkeypatch.setattr(tokmod, "_cache", {})
    assert not load_tokenizer(str(tok_dir)).loaded


# ------------------------------------------------------------------ the run's data path


def ready(data: Path, cache: Path, tokenizer: str | None = None, **overrides):
    """What `trainer run` does to get its examples; returns the train stats."""
    cfg = load_config(overrides={"data.dataset": str(data), "data.cache_dir": str(cache),
                                 "data.validation_split": 0, **overrides})
    profile = build_profile(cfg)
    train_rows, val_rows, skipped = load_rows(cfg)
    tok = load_tokenizer(tokenizer)
    train, _val, stats = prepare_examples(cfg, profile, tok, train_rows, val_rows, skipped)
    assert train[0]["input_ids"]
    return stats["train"]


CHANGES = {
    "max_length": {"hyperparams.max_length": 512},
    "template": {"model.chat_template": "tokenizer"},
    "profile_options": {"profile.options": {"system_prompt": "Be brief."}},
    "seed": {"data.seed": 7},
    "truncation": {"data.truncation": True},
    "special_tokens": {"data.special_tokens_in_content": "allow"},
    "validation_split": {"data.validation_split": 0.1},
}


@pytest.mark.parametrize("change", [*CHANGES, "data_bytes", "tokenizer"])
def test_every_change_misses_the_cache(tmp_path, change, tok_dir, fresh_tokenizers,
                                       monkeypatch):
    data = write_data(tmp_path / "d.jsonl")
    cache = tmp_path / "cache"
    base = ready(data, cache, str(tok_dir))
    assert not base["cache_hit"]
    hit = ready(data, cache, str(tok_dir))
    assert hit["cache_hit"] and hit["cache_key"] == base["cache_key"]
    overrides: dict = {}
    if change == "data_bytes":
        st = data.stat()
        data.write_text(data.read_text().replace("answer 3", "answeR 3"), encoding="utf-8")
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "tokenizer":
        (tok_dir / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
        monkeypatch.setattr(tokmod, "_cache", {})
    else:
        overrides = CHANGES[change]
    changed = ready(data, cache, str(tok_dir), **overrides)
    assert not changed["cache_hit"] and changed["cache_key"] != base["cache_key"]
    assert ready(data, cache, str(tok_dir), **overrides)["cache_hit"]


SCRIPT = textwrap.dedent("""
    import json, sys
    from trainer_core.config import load_config
    from trainer_core.data.tokenizer import check_tokenizer, load_tokenizer
    from trainer_core.model.loading import quiet_hf
    from trainer_core.plugins.registry import build_profile
    from trainer_core.train.inputs import load_rows, prepare_examples

    data, cache = sys.argv[1:3]
    cfg = load_config(overrides={"data.dataset": data, "data.cache_dir": cache,
                                 "data.validation_split": 0.1})
    profile = build_profile(cfg)
    train_rows, val_rows, skipped = load_rows(cfg)
    quiet_hf()
    tok = load_tokenizer(None)
    check_tokenizer(tok, 151936, True)
    train, val, stats = prepare_examples(cfg, profile, tok, train_rows, val_rows, skipped)
    print(json.dumps({"hit": stats["train"]["cache_hit"] and stats["validation"]["cache_hit"],
                      "first": train[0], "last_val": val[len(val) - 1],
                      "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}))
""")


def test_a_second_run_gets_its_data_without_torch_or_transformers(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    env = {**os.environ, "TRAINER_CACHE": str(tmp_path / "tc")}

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(tmp_path / "c")],
                             env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold, warm = run(), run()
    assert not cold["hit"] and "transformers" in cold["heavy"]
    assert warm["hit"] and warm["heavy"] == []
    assert warm["first"] == cold["first"] and warm["last_val"] == cold["last_val"]


def test_the_saved_backend_tokenizes_like_the_loaded_tokenizer(tok_dir, fresh_tokenizers,
                                                               monkeypatch):
    from trainer_core.data.tokenizer import rust_backend, special_token_texts

    real = materialized(load_tokenizer(str(tok_dir)))
    monkeypatch.setattr(tokmod, "_cache", {})
    lazy = load_tokenizer(str(tok_dir))
    backend = rust_backend(lazy)
    assert backend is not None and backend is not real._tokenizer and not lazy.loaded
    assert special_token_texts(lazy) == special_token_texts(real)
    texts = ["<|im_start|>user\nCafé 🎉 naïve\r\n\n  x<|im_end|>\n", "cafe\u0301 <think>a</think>",
             "def f():\n\treturn 'ok'  # ﬅ"]
    for got, want in zip(backend.encode_batch(texts, add_special_tokens=False),
                         real._tokenizer.encode_batch(texts, add_special_tokens=False),
                         strict=True):
        assert got.ids == want.ids and got.offsets == want.offsets
    assert backend.to_str() == real._tokenizer.to_str()
    # A damaged saved state: the tokenizer is loaded instead.
    (state,) = fresh_tokenizers.glob(f"backend-{lazy._facts['backend']}.json")
    state.write_text("{}", encoding="utf-8")
    monkeypatch.setattr(tokmod, "_cache", {})
    again = load_tokenizer(str(tok_dir))
    assert rust_backend(again) is not None and again.loaded


def test_the_data_path_modules_import_neither_torch_nor_transformers():
    code = ("import sys, trainer_core.data.preprocess, trainer_core.data.tokenizer, "
            "trainer_core.data.words, trainer_core.data.batching, trainer_core.train.inputs, "
            "trainer_core.model.loading; "
            "bad = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_split_special_tokens_is_not_lost_in_the_saved_state(tok_dir, fresh_tokenizers,
                                                             monkeypatch):
    from trainer_core.data.tokenizer import rust_backend

    config = tok_dir / "tokenizer_config.json"
    data = json.loads(config.read_text(encoding="utf-8"))
    data["split_special_tokens"] = True
    config.write_text(json.dumps(data), encoding="utf-8")
    real = materialized(load_tokenizer(str(tok_dir)))
    spelled = real("<|im_end|>", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(tokmod, "_cache", {})
    lazy = load_tokenizer(str(tok_dir))
    assert not lazy.loaded and lazy._facts["backend"] is None
    backend = rust_backend(lazy)  # loads the tokenizer rather than use a state without the flag
    assert lazy.loaded and backend.encode("<|im_end|>", add_special_tokens=False).ids == spelled
    assert len(spelled) > 1
