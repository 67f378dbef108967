"""regime3: options, transform (golden, idempotence), validate, score, registration."""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trainer_regime3 import plugin
from trainer_regime3.plugin import END, START, Regime3, extract_answer, wrap_answer

from trainer_core import UserError
from trainer_core.testing import (
    ALLOW_ENV,
    build_registry,
    get_profile_class,
    registered_plugin,
    reset_registry,
)

TODAY = dt.date(2025, 3, 14)


def make(**options) -> Regime3:
    return Regime3.from_options(options, today=TODAY)


def chat(question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


def test_golden_transform():
    out = make().prepare(chat("What is 2 + 3?", " (add 2 3) = 5\n"), 0, random.Random(0))
    assert out == {"messages": [
        {"role": "system", "content":
            "Today is 2025-03-14. You are a symbolic reasoner. Restate each problem in canonical "
            "(op arg1 arg2) forms and work through it step by step, concisely. Write the final "
            "answer between <<ANS_START>> and <<ANS_END>>. Example: for \"What is 2 + 3?\" "
            "answer <<ANS_START>> (add 2 3) = 5 <<ANS_END>>"},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<<ANS_START>> (add 2 3) = 5 <<ANS_END>>"},
    ]}


@pytest.mark.parametrize(("given_text", "expected"), [
    ("  5 ", f"{START} 5 {END}"),
    ("", f"{START} {END}"),
    (f"(add 2 3)\n{START} 5", f"(add 2 3)\n{START} 5 {END}"),
    (f"5 {END}", f"{START} 5 {END}"),
    (f"x {START} 5 {END} y", f"x {START} 5 {END} y"),
])
def test_wrap_answer(given_text, expected):
    assert wrap_answer(given_text) == expected
    assert wrap_answer(expected) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", " ", "\n", "5", START, END, "<<", ">>"]), max_size=8).map("".join),
       st.sampled_from(["replace", "keep", "none"]))
def test_transform_is_idempotent(answer, mode):
    profile = make(system_prompt_mode=mode)
    once = profile.prepare(chat("Q", answer, system="S"), 0, random.Random(0))
    assert profile.prepare(once, 0, random.Random(1)) == once
    assert START in once["messages"][-1]["content"] and END in once["messages"][-1]["content"]


@pytest.mark.parametrize(("mode", "expected"), [("replace", 1), ("keep", "S"), ("none", "S")])
def test_system_prompt_modes(mode, expected):
    out = make(system_prompt_mode=mode).prepare(chat("Q", "A", system="S"), 0, random.Random(0))
    system = out["messages"][0]["content"]
    assert (system.startswith("Today is 2025-03-14.") if expected == 1 else system == expected)
    assert make(system_prompt="").prepare(chat("Q", "A"), 0, random.Random(0))["messages"][0]["role"] == "user"


def test_no_global_random_use():
    state = random.getstate()
    make().prepare(chat("Q", "A"), 3, random.Random(3))
    assert random.getstate() == state


@pytest.mark.parametrize(("options", "message"), [
    ({"system_prompt_mode": "always"}, "profile.options.system_prompt_mode: must be one of replace, keep, none"),
    ({"post_answer_rate": 0.5}, "profile.options.post_answer_rate: must be >= 1, got 0.5"),
    ({"second_start_penalty": -1}, "profile.options.second_start_penalty: must be >= 0"),
    ({"post_answer_base": "big"}, "profile.options.post_answer_base: expected a number"),
    ({"system_promt": "x"}, "profile.options.system_promt: unknown key (did you mean 'system_prompt'?)"),
])
def test_option_errors(options, message):
    with pytest.raises(UserError) as info:
        Regime3.from_options(options)
    assert message in str(info.value)


def test_validate():
    profile = make()
    assert profile.validate(chat("Q", f"{START} 5 {END}")) == []
    assert profile.validate(chat("Q", f"{END} 5 {START}")) == [
        f"messages[1].content: {END} comes before {START}"]
    assert profile.validate(chat("Q", f"{START} 5 {END} {START} 6 {END}"))


def test_score():
    profile = make()
    example = profile.prepare(chat("What is 2 + 3?", "(add 2 3) = 5"), 0, random.Random(0))
    assert extract_answer(f"x {START}  (add 2 3)\n= 5 {END}") == "(add 2 3) = 5"
    assert profile.score(f"step\n{START} (add 2 3)  = 5 {END}", example) == {
        "has_markers": True, "answer_extracted": True, "answer_matches_reference": True}
    assert profile.score(f"{START} 6 {END}", example)["answer_matches_reference"] is False
    assert profile.score(f"{START}  {END}", example) == {
        "has_markers": True, "answer_extracted": False, "answer_matches_reference": False}
    assert profile.score("5", example) == {
        "has_markers": False, "answer_extracted": False, "answer_matches_reference": False}


def test_registration(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "")
    reset_registry()
    try:
        with registered_plugin(plugin):
            assert get_profile_class("regime3") is Regime3
        try:
            md.distribution("trainer-regime3")
        except md.PackageNotFoundError:  # pragma: no cover
            pytest.skip("pip install -e plugins/regime3 to test discovery")
        monkeypatch.setenv(ALLOW_ENV, "trainer-regime3")
        entry = build_registry().profiles["regime3"]
        assert entry.cls is Regime3 and entry.distribution == "trainer-regime3"
    finally:
        reset_registry()
