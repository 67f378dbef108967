"""JSONL reading and validation: every problem kind, with file:line: field: why messages."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from trainer_core.data.rows import (
    LINE_KEY,
    check_rows,
    example_of,
    example_problems,
    read_rows,
    split_rows,
)
from trainer_core.errors import DataError, UserError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(tmp_path: Path, lines: list, name: str = "train.jsonl") -> str:
    """Write lines (dicts become JSON, str/bytes are written as they are) joined by newlines."""
    parts = []
    for line in lines:
        if isinstance(line, bytes):
            parts.append(line)
        elif isinstance(line, str):
            parts.append(line.encode())
        else:
            parts.append(json.dumps(line, ensure_ascii=False).encode())
    path = tmp_path / name
    path.write_bytes(b"\n".join(parts) + b"\n")
    return str(path)


def msgs(*pairs) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize(
    "line, expected, reason",
    [
        ("{not json", r"train.jsonl:2: not valid JSON: .* at column 2", "not_json"),
        ("[1, 2]", "train.jsonl:2: expected a JSON object, got an array", "not_object"),
        ('"text"', "train.jsonl:2: expected a JSON object, got a string", "not_object"),
        ({"metadata": {}}, r"train.jsonl:2: messages: missing \(give messages", "missing_messages"),
        ({"messages": "hi"}, "train.jsonl:2: messages: expected an array, got a string", "bad_messages"),
        ({"messages": []}, r"train.jsonl:2: messages: empty", "empty_messages"),
        ({"messages": ["hi"]}, r"train.jsonl:2: messages\[0\]: expected an object, got a string", "bad_message"),
        (msgs(("user", "q"), ("bot", "a")), r'^train.jsonl:2: messages\[1\].role: unknown role "bot"$', "unknown_role"),
        ({"messages": [{"content": "q"}]}, r"train.jsonl:2: messages\[0\].role: missing", "missing_role"),
        ({"messages": [{"role": "user"}]}, r"train.jsonl:2: messages\[0\].content: missing", "missing_content"),
        (msgs(("user", 3), ("assistant", "a")), r"messages\[0\].content: expected a string, got a number", "bad_content"),
        (msgs(("user", "q"), ("assistant", None)), r"messages\[1\].content: expected a string, got null", "bad_content"),
        (msgs(("system", "s"), ("user", "q")), "train.jsonl:2: messages: no assistant turn", "no_assistant"),
        (msgs(("user", "q"), ("assistant", " \n\t")), r"messages\[1\].content: empty assistant content", "empty_assistant"),
        ({"prompt": "q"}, "train.jsonl:2: completion: missing", "missing_completion"),
        ({"prompt": 1, "completion": "a"}, "train.jsonl:2: prompt: expected a string", "bad_content"),
        ({"prompt": "q", "completion": "  "}, "train.jsonl:2: completion: empty completion", "empty_assistant"),
        ({**GOOD, "prompt": "q", "completion": "a"}, "train.jsonl:2: give either messages", "mixed_formats"),
    ],
)
def test_each_problem_kind_names_file_line_and_field(tmp_path, line, expected, reason):
    path = write(tmp_path, [GOOD, line, GOOD])
    rows, problems = read_rows(path)
    assert [r[LINE_KEY] for r in rows] == [1, 3]  # the bad row is left out, others keep lines
    assert len(problems) == 1
    assert problems[0].reason == reason and problems[0].line == 2
    msg = str(problems[0]).replace(str(tmp_path) + "/", "")
    assert re.search(expected, msg), msg


def test_several_problems_in_one_row_are_all_reported(tmp_path):
    path = write(tmp_path, [{"messages": [{"role": "bot", "content": 1}, 5]}])
    _, problems = read_rows(path)
    assert [p.field for p in problems] == ["messages[0].role", "messages[0].content", "messages[1]"]
    assert check_rows(problems, "skip", path) == {"unknown_role": 1}  # one row, first reason


def test_valid_rows_prompt_completion_metadata_blank_lines(tmp_path):
    path = write(
        tmp_path,
        [
            "",
            {**GOOD, "metadata": {"source": "x"}},
            "   ",
            {"prompt": "2+2?", "completion": "4", "id": 7},
        ],
    )
    rows, problems = read_rows(path)
    assert problems == []  # blank lines are not problems
    assert rows[0] == {**GOOD, "metadata": {"source": "x"}, LINE_KEY: 2}
    assert rows[1] == {
        "id": 7,
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        LINE_KEY: 4,
    }
    assert example_of(rows[1]) == {k: v for k, v in rows[1].items() if k != LINE_KEY}


def test_bom_and_crlf_are_transparent(tmp_path):
    body = "\r\n".join(json.dumps(x, ensure_ascii=False) for x in [GOOD, msgs(("user", "é"), ("assistant", "ü\r\n"))])
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode() + b"\r\n\r\n")
    rows, problems = read_rows(str(path))
    assert problems == []
    assert [example_of(r) for r in rows] == [GOOD, msgs(("user", "é"), ("assistant", "ü\r\n"))]
    assert [r[LINE_KEY] for r in rows] == [1, 2]


def test_invalid_utf8_is_a_problem_for_that_line(tmp_path):
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
    path = write(tmp_path, [GOOD, bad, GOOD])
    rows, problems = read_rows(path)
    assert len(rows) == 2
    assert [(p.line, p.reason) for p in problems] == [(2, "invalid_utf8")]
    offset = bad.index(b"\xe9")  # byte offset within the line
    assert str(problems[0]) == f"{path}:2: invalid UTF-8 at byte offset {offset}"


def test_unreadable_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read data file"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_error_policy_lists_first_20_and_total(tmp_path):
    lines = [GOOD] + [msgs(("user", "q"), ("bot", "a"))] * 57
    path = write(tmp_path, lines)
    rows, problems = read_rows(path)
    assert len(rows) == 1 and len(problems) == 57
    with pytest.raises(DataError) as info:
        check_rows(problems, "error", path)
    text = str(info.value).splitlines()
    assert text[0].startswith(f"{path}: 57 invalid rows")
    assert text[1] == f'{path}:2: messages[1].role: unknown role "bot"'
    assert text[20] == f'{path}:21: messages[1].role: unknown role "bot"'
    assert text[21] == "... and 37 more (57 problems in total)"
    assert len(text) == 22
    assert info.value.exit_code == 2


def test_error_policy_few_problems_no_more_line(tmp_path):
    path = write(tmp_path, [GOOD, "{x"])
    _, problems = read_rows(path)
    with pytest.raises(DataError) as info:
        check_rows(problems, "error", path)
    assert "more" not in str(info.value) and f"{path}:2: not valid JSON" in str(info.value)
    assert check_rows([], "error", path) == {}


def test_skip_policy_counts_rows_by_reason(tmp_path):
    path = write(
        tmp_path,
        [GOOD, "{x", "{y", msgs(("user", "q")), msgs(("user", "q"), ("assistant", "")), b"\xff", GOOD],
    )
    rows, problems = read_rows(path)
    assert len(rows) == 2
    assert check_rows(problems, "skip", path) == {
        "not_json": 2,
        "no_assistant": 1,
        "empty_assistant": 1,
        "invalid_utf8": 1,
    }
    with pytest.raises(UserError, match="on_invalid"):
        check_rows(problems, "ignore", path)


def test_example_problems_for_transformed_examples():
    assert example_problems(GOOD) == []
    assert example_problems({"messages": []}) == ["messages: expected a non-empty array"]
    assert example_problems(msgs(("user", "q"), ("assistant", 5))) == [
        "messages[1].content: expected a string, got a number"
    ]


def test_split_is_seeded_deterministic_and_leaves_global_random_alone():
    rows = [{"messages": [], LINE_KEY: i} for i in range(100)]
    random.seed(1234)
    state = random.getstate()
    train, val = split_rows(rows, 0.1, seed=7)
    assert random.getstate() == state
    assert len(val) == 10 and len(train) == 90
    lines = lambda part: [r[LINE_KEY] for r in part]  # noqa: E731
    assert sorted(lines(train) + lines(val)) == list(range(100))
    assert lines(val) == sorted(lines(val))  # file order kept
    assert split_rows(rows, 0.1, seed=7) == (train, val)
    assert lines(split_rows(rows, 0.1, seed=8)[1]) != lines(val)
    assert lines(val) != list(range(10))  # really random, not the head of the file


def test_split_edge_cases():
    rows = [{"messages": [], LINE_KEY: i} for i in range(3)]
    assert split_rows(rows, 0.0, 1) == (rows, [])
    assert len(split_rows(rows, 0.01, 1)[1]) == 1  # a positive fraction holds out at least one
    with pytest.raises(UserError, match="no training rows"):
        split_rows(rows[:1], 0.5, 1)
    with pytest.raises(UserError, match="validation_split"):
        split_rows(rows, 1.0, 1)
