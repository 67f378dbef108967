"""emoji_think: options, transform (golden, idempotence, determinism), validate, score."""

from __future__ import annotations

import copy
import datetime as dt
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trainer_emoji_think.profile import (
    STOP_EMOJIS,
    THINKING_EMOJIS,
    EmojiThink,
    Run,
    leading_run,
    parse_stop,
    parse_think,
    stop_suffix,
)

from trainer_core import UserError

TODAY = dt.date(2025, 3, 14)
SYSTEM = "Today is 2025-03-14. You are happy. You enjoy helping others."
THINK3 = "For this task, think with 🤔 /three/ times."
STOP2 = "When finished, emit 🛑 /twice/ to signal completion."


def make(**options) -> EmojiThink:
    return EmojiThink.from_options(options, today=TODAY)


def fixed(**options) -> EmojiThink:
    """One choice for everything: 🤔 x3 and 🛑 x2."""
    return make(thinking_emojis=["🤔"], think_min=3, think_max=3, stop_emojis=["🛑"],
                stop_min=2, stop_max=2, **options)


def chat(*turns: str, system: str | None = None) -> dict:
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": r, "content": c} for r, c in zip(roles, turns, strict=False)]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages, "metadata": {"id": 7}}


def rng_for(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


# ------------------------------------------------------------------------------ golden


def test_golden_single_turn():
    out = fixed().prepare(chat("What is 2+2?", "4"), 0, random.Random(0))
    assert out == {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"What is 2+2?\n\n{THINK3}\n\n{STOP2}"},
            {"role": "assistant", "content": "🤔🤔🤔\n4\n🛑🛑"},
        ],
        "metadata": {"id": 7},
    }


def test_golden_default_options_draws_pinned():
    # Pins what seed/index give with the default pools (a change here changes trained data:
    # bump EmojiThink.version).
    out = make().prepare(chat("Hi", "Hello!"), 3, rng_for(42, 3))
    assert out["messages"][1]["content"] == (
        "Hi\n\nFor this task, think with ⚡ /two/ times.\n\n"
        "When finished, emit 🚦 /four times/ to signal completion."
    )
    assert out["messages"][2]["content"] == "⚡⚡\nHello!\n🚦🚦🚦🚦"


def test_think_tags_removed_keeping_their_text():
    out = fixed().prepare(chat("Q", "<think>\nhmm\n</think>\n\nA"), 0, random.Random(0))
    assert out["messages"][2]["content"] == "🤔🤔🤔\nhmm\n\nA\n🛑🛑"


def test_existing_instructions_are_followed():
    user = "Q\n\nFor this task, think with 💡 /five/ times.\n\nWhen finished, emit ❌ /four times/ to signal completion."
    out = make().prepare(chat(user, "A"), 0, random.Random(0))
    assert out["messages"][1]["content"] == user
    assert out["messages"][2]["content"] == "💡💡💡💡💡\nA\n❌❌❌❌"


def test_existing_prefix_and_suffix_are_instructed():
    # The answer already frames itself; the user turn must name exactly that, even when it
    # carried a different instruction (which is rewritten in place).
    user = "Q\n\nFor this task, think with 💭 /two/ times."
    out = make().prepare(chat(user, "🧠🧠🧠🧠\nA\n⏹️⏹️⏹️"), 0, random.Random(0))
    assert out["messages"][1]["content"] == (
        "Q\n\nFor this task, think with 🧠 /four/ times.\n\n"
        "When finished, emit ⏹️ /three times/ to signal completion."
    )
    assert out["messages"][2]["content"] == "🧠🧠🧠🧠\nA\n⏹️⏹️⏹️"


def test_multi_turn_each_answer_follows_its_instruction():
    example = chat("Q1", "A1", "Q2", "✨✨\nA2", "Q3", "A3")
    out = make().prepare(example, 5, rng_for(1, 5))
    msgs = out["messages"]
    for user, answer in [(msgs[1], msgs[2]), (msgs[3], msgs[4]), (msgs[5], msgs[6])]:
        assert leading_run(answer["content"], THINKING_EMOJIS) == parse_think(user["content"], THINKING_EMOJIS)
        assert stop_suffix(answer["content"], STOP_EMOJIS) == parse_stop(user["content"], STOP_EMOJIS)
    assert parse_think(msgs[3]["content"], THINKING_EMOJIS) == Run("✨", 2)
    # Turns without data of their own share the example's draw.
    assert parse_think(msgs[1]["content"], THINKING_EMOJIS) == parse_think(msgs[5]["content"], THINKING_EMOJIS)


def test_final_user_turn_without_answer_gets_instructions():
    out = fixed().prepare({"messages": [{"role": "user", "content": "Q"}]}, 0, random.Random(0))
    assert out["messages"][-1]["content"] == f"Q\n\n{THINK3}\n\n{STOP2}"


@pytest.mark.parametrize(
    ("mode", "given", "expected"),
    [("replace", "old", SYSTEM), ("keep", "old", "old"), ("keep", None, SYSTEM),
     ("none", "old", "old"), ("none", None, None)],
)
def test_system_prompt_modes(mode, given, expected):
    out = fixed(system_prompt_mode=mode).prepare(chat("Q", "A", system=given), 0, random.Random(0))
    systems = [m["content"] for m in out["messages"] if m["role"] == "system"]
    assert systems == ([expected] if expected else [])


def test_apply_fraction_zero_only_adds_the_system_prompt():
    example = chat("Q", "<think>x</think>A")
    out = make(apply_fraction=0.0).prepare(example, 0, random.Random(0))
    assert out == {"messages": [{"role": "system", "content": SYSTEM}, *example["messages"]],
                   "metadata": {"id": 7}}


def test_apply_fraction_is_per_example_and_deterministic():
    profile = make(apply_fraction=0.5)

    def applied(i):
        return profile.prepare(chat("Q", "A"), i, rng_for(0, i))["messages"][2]["content"] != "A"

    first = [applied(i) for i in range(200)]
    assert first == [applied(i) for i in range(200)]
    assert 60 < sum(first) < 140


def test_transform_does_not_mutate_its_input():
    example = chat("Q", "<think>x</think>A")
    before = copy.deepcopy(example)
    make().prepare(example, 0, random.Random(0))
    assert example == before


# ---------------------------------------------------------------------- determinism


def test_draws_depend_only_on_the_example_rng():
    profile, example = make(), chat("Q", "A")
    state = random.getstate()
    runs = [[profile.prepare(example, i, rng_for(seed, i)) for i in range(30)] for seed in (1, 1, 2)]
    assert random.getstate() == state  # never touches the global RNG
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    # Varied draws across examples: more than one emoji and count.
    users = {r["messages"][1]["content"] for r in runs[0]}
    assert len(users) > 10


def test_global_random_state_does_not_matter():
    profile, example = make(), chat("Q", "A")
    random.seed(1)
    a = profile.prepare(example, 0, rng_for(0, 0))
    random.seed(2)
    assert profile.prepare(example, 0, rng_for(0, 0)) == a


# ---------------------------------------------------------------------- idempotence

_FRAGMENTS = [
    "a", "b c", " ", "\n", "\n\n", "<think>", "</think>", "<", ">", "/", "two", *THINKING_EMOJIS,
    *STOP_EMOJIS, "⏹", "\ufe0f", THINK3, STOP2, "For this task, think with 🙂 /two/ times.",
    "When finished, emit 🛑 /five times/ to signal completion.",
    "For this task, think with 💡 /25/ times.", "🛑🛑🛑🛑🛑",
]
_text = st.lists(st.sampled_from(_FRAGMENTS), max_size=8).map("".join)
_message = st.tuples(st.sampled_from(["user", "assistant", "system"]), _text).map(
    lambda rc: {"role": rc[0], "content": rc[1]})
_example = st.lists(_message, min_size=1, max_size=6).map(lambda ms: {"messages": ms})
_options = st.fixed_dictionaries({
    "apply_fraction": st.sampled_from([0.0, 0.5, 1.0]),
    "system_prompt_mode": st.sampled_from(["replace", "keep", "none"]),
    "think_min": st.integers(1, 3),
    "stop_min": st.integers(2, 4),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(example=_example, options=_options, seed=st.integers(0, 2**32), index=st.integers(0, 999))
def test_transform_is_idempotent(example, options, seed, index):
    profile = make(think_max=8, stop_max=4, **options)
    once = profile.prepare(example, index, random.Random(seed))
    assert profile.prepare(once, index, random.Random(seed)) == once
    if options["apply_fraction"] == 1.0:  # then any rng gives the same second pass
        assert profile.prepare(once, index, random.Random(seed + 1)) == once
        _check_instructions_match(once["messages"])


def _check_instructions_match(messages):
    for i, m in enumerate(messages):
        if m["role"] != "user":
            continue
        rest = [n for n in messages[i + 1:] if n["role"] != "system"]
        if rest and rest[0]["role"] == "assistant":
            answer = rest[0]["content"]
            assert leading_run(answer, THINKING_EMOJIS) == parse_think(m["content"], THINKING_EMOJIS)
            assert stop_suffix(answer, STOP_EMOJIS) == parse_stop(m["content"], STOP_EMOJIS)


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"think_min": 5, "think_max": 3}, "profile.options.think_max: must be >= think_min (5), got 3"),
        ({"stop_max": 5}, "profile.options.stop_max: must be in 2..4, got 5"),
        ({"stop_min": 1}, "profile.options.stop_min: must be in 2..4, got 1"),
        ({"stop_min": 4, "stop_max": 3}, "profile.options.stop_max: must be >= stop_min (4), got 3"),
        ({"apply_fraction": 1.5}, "profile.options.apply_fraction: must be in [0, 1], got 1.5"),
        ({"thinking_emojis": []}, "profile.options.thinking_emojis: must not be empty"),
        ({"stop_emojis": ["🛑", "🛑"]}, "profile.options.stop_emojis: has duplicates"),
        ({"stop_emojis": ["🤔"]}, "profile.options.stop_emojis: shares emojis with thinking_emojis"),
        ({"thinking_emojis": ["ok"]}, "profile.options.thinking_emojis: must hold emojis"),
        ({"thinking_emojis": "🤔"}, "profile.options.thinking_emojis: expected a list"),
        ({"system_prompt_mode": "merge"}, "profile.options.system_prompt_mode: must be one of replace, keep, none"),
        ({"think_tag_schedule": [[4, 2.0], [2, 1.0]]}, "profile.options.think_tag_schedule: steps must be positive and strictly increasing"),
        ({"post_stop_rate": 0.5}, "profile.options.post_stop_rate: must be >= 1"),
        ({"think_max": 2.5}, "profile.options.think_max: expected an integer"),
        ({"stop_emoji": ["🛑"]}, "profile.options.stop_emoji: unknown key (did you mean 'stop_emojis'?)"),
    ],
)
def test_option_errors_name_the_field(options, message):
    with pytest.raises(UserError) as info:
        EmojiThink.from_options(options)
    assert message in str(info.value)


def test_options_defaults_and_overrides():
    o = make().options
    assert o.thinking_emojis == THINKING_EMOJIS and o.stop_emojis == STOP_EMOJIS
    assert (o.think_min, o.think_max, o.stop_min, o.stop_max) == (2, 8, 2, 4)
    assert o.think_tag_schedule == ((4, 8.0), (8, 2.0), (12, 1.5))
    custom = make(think_tag_schedule=[[2, 3]], post_stop_base=10).options
    assert custom.think_tag_schedule == ((2, 3.0),) and custom.post_stop_base == 10.0


# --------------------------------------------------------------------- validate / score


def test_validate_flags_unreadable_instructions():
    profile = make()
    assert profile.validate(chat(f"Q\n\n{THINK3}\n\n{STOP2}", "A")) == []
    problems = profile.validate(chat("Q For this task, think with 🙂 /two/ times.", "A"))
    assert problems and problems[0].startswith("messages[0].content: a thinking instruction")
    assert profile.validate(chat("When finished, emit 🛑 /five times/ to signal completion.", "A"))


def test_score():
    profile = make()
    example = fixed().prepare(chat("Q", "A"), 0, random.Random(0))  # 🤔 x3, 🛑 x2
    assert profile.score("🤔🤔🤔\nA\n🛑🛑", example) == {
        "has_think_prefix": True, "think_matches_instruction": True, "has_stop_suffix": True,
        "stop_matches_instruction": True, "stopped_after_stop": True,
    }
    assert profile.score("🤔🤔\nA\n🛑🛑🛑 more", example) == {
        "has_think_prefix": True, "think_matches_instruction": False, "has_stop_suffix": True,
        "stop_matches_instruction": False, "stopped_after_stop": False,
    }
    assert profile.score("A", example) == {
        "has_think_prefix": False, "think_matches_instruction": False, "has_stop_suffix": False,
        "stop_matches_instruction": False, "stopped_after_stop": False,
    }
    # A single stop emoji is no stop run; the later run counts.
    assert profile.score("💭💭\nA 🛑 B\n⏹️⏹️", example)["has_stop_suffix"] is True
