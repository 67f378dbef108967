"""Reading and validating training JSONL before any model is loaded.

Each line is a JSON object, either ``{"messages": [{"role", "content"}, ...]}`` (other keys such
as ``metadata`` are carried along) or ``{"prompt": str, "completion": str}`` (turned into a user
and an assistant message). Problems are reported as ``file:line: field: why``. Every valid row
keeps its 1-based source line in the ``_line`` key (``LINE_KEY``); strip it with
``example_of(row)`` before handing the row to a profile.

Imports nothing heavy: the CLI validates data with this module before loading torch.
"""

from __future__ import annotations

import json
import os
import random
import stat
from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs

from trainer_core.errors import DataError, UserError

ROLES = ("system", "user", "assistant")
LINE_KEY = "_line"
MAX_LISTED = 20
ON_INVALID = ("error", "skip")
#: Rows nest messages two or three levels deep; metadata may add some. Deeper is refused.
MAX_DEPTH = 64
_BOM = b"\xef\xbb\xbf"


@attrs.frozen
class Problem:
    """One problem with one line of a data file.

    ``reason`` is a short stable key (``not_json``, ``unknown_role``...) used to count skipped
    rows; ``field`` is a dotted path inside the row (empty for the whole line).
    """

    path: str
    line: int
    field: str
    reason: str
    detail: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.path}:{self.line}: {where}{self.detail}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def read_rows(path: str) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Read a JSONL file into valid rows and the problems of the invalid ones.

    Blank lines are skipped; a UTF-8 BOM and CRLF line ends are accepted. Valid rows come back
    in file order as ``{"messages": [...], ..., "_line": N}``; ``prompt``/``completion`` rows are
    converted to messages. Raises ``UserError`` only when the file cannot be read at all.
    """
    rows: list[dict[str, Any]] = []
    problems: list[Problem] = []
    try:
        with open(path, "rb") as fh:  # binary: decode per line so one bad byte costs one row
            for number, line in enumerate(fh, start=1):
                if number == 1 and line.startswith(_BOM):
                    line = line[len(_BOM) :]
                _read_line(line.rstrip(b"\n").removesuffix(b"\r"), path, number, rows, problems)
    except OSError as exc:
        raise UserError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    return rows, problems


def _read_line(
    line: bytes, path: str, number: int, rows: list[dict[str, Any]], problems: list[Problem]
) -> None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(
            Problem(path, number, "", "invalid_utf8", f"invalid UTF-8 at byte offset {exc.start}")
        )
        return
    if not text.strip():
        return
    row, row_problems = parse_row(text, path, number)
    if row is None:
        problems.extend(row_problems)
    else:
        row[LINE_KEY] = number
        rows.append(row)


def parse_row(text: str, path: str, line: int) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Parse and validate one JSONL line; returns ``(row, [])`` or ``(None, problems)``."""

    def problem(field: str, reason: str, detail: str) -> Problem:
        return Problem(path, line, field, reason, detail)

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [problem("", "not_json", f"not valid JSON: {exc.msg} at column {exc.colno}")]
    except RecursionError:
        return None, [problem("", "too_deep", f"nested more than {MAX_DEPTH} levels deep")]
    except ValueError as exc:  # an integer of more than 4300 digits
        return None, [problem("", "not_json", f"not accepted: {exc}")]
    bad = _unreadable_value(obj)
    if bad is not None:
        return None, [problem(bad[0], bad[1], bad[2])]
    if not isinstance(obj, dict):
        return None, [problem("", "not_object", f"expected a JSON object, got {_kind(obj)}")]
    if "messages" not in obj and ("prompt" in obj or "completion" in obj):
        return _from_prompt_completion(obj, problem)
    if "messages" not in obj:
        return None, [
            problem("messages", "missing_messages", "missing (give messages or prompt/completion)")
        ]
    if "prompt" in obj or "completion" in obj:
        return None, [
            problem("", "mixed_formats", "give either messages or prompt/completion, not both")
        ]
    messages = obj["messages"]
    if not isinstance(messages, list):
        return None, [problem("messages", "bad_messages", f"expected an array, got {_kind(messages)}")]
    if not messages:
        return None, [problem("messages", "empty_messages", "empty (needs at least one turn)")]
    problems = _check_messages(messages, problem)
    return (None, problems) if problems else (obj, [])


def _unreadable_value(obj: Any) -> tuple[str, str, str] | None:
    """``(field, reason, detail)`` for values later steps cannot handle: nesting deeper than
    ``MAX_DEPTH`` (deepcopy and hashing recurse) and strings with lone surrogates (not
    encodable as UTF-8, so no tokenizer can read them). Iterative, so any input is safe."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 1)]
    while stack:
        node, where, depth = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as exc:
                code = f"\\u{ord(node[exc.start]):04x}"
                return where, "invalid_text", f"lone surrogate {code} (not valid Unicode text)"
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            return where, "too_deep", f"nested more than {MAX_DEPTH} levels deep"
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if isinstance(key, str):
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return where, "invalid_text", "lone surrogate in a key"
            path = f"{where}[{key}]" if isinstance(key, int) else (f"{where}.{key}" if where
                                                                    else str(key))
            stack.append((child, path, depth + 1))
    return None


def check_data_file(path: str | os.PathLike, field: str) -> None:
    """Refuse what is not a readable regular file (a directory, a FIFO, ``/dev/null``) with
    one line naming the config field; reading a FIFO would block, a directory would crash."""
    p = str(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UserError(f"{field}: {p}: file not found") from None
    except OSError as exc:
        raise UserError(f"{field}: {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{field}: {p} is a directory; give a JSONL file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{field}: {p} is not a regular file (a FIFO or device); give a JSONL "
                        "file")
    if st.st_size == 0:
        raise UserError(f"{field}: {p} is empty")


def _check_messages(messages: list[Any], problem) -> list[Problem]:
    problems: list[Problem] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append(problem(where, "bad_message", f"expected an object, got {_kind(m)}"))
            continue
        role = m.get("role")
        if "role" not in m:
            problems.append(problem(f"{where}.role", "missing_role", "missing"))
        elif role not in ROLES:
            shown = json.dumps(role, ensure_ascii=False)
            problems.append(problem(f"{where}.role", "unknown_role", f"unknown role {shown}"))
        if "content" not in m:
            problems.append(problem(f"{where}.content", "missing_content", "missing"))
        elif not isinstance(m["content"], str):
            problems.append(
                problem(f"{where}.content", "bad_content",
                        f"expected a string, got {_kind(m['content'])}")
            )
        elif role == "assistant" and not m["content"].strip():
            problems.append(problem(f"{where}.content", "empty_assistant", "empty assistant content"))
    # "No assistant turn" only makes sense once every role is readable.
    if not problems and not any(m["role"] == "assistant" for m in messages):
        problems.append(problem("messages", "no_assistant", "no assistant turn to learn from"))
    return problems


def _from_prompt_completion(obj: dict[str, Any], problem) -> tuple[dict[str, Any] | None, list[Problem]]:
    problems = []
    for key in ("prompt", "completion"):
        if key not in obj:
            problems.append(problem(key, "missing_" + key, "missing"))
        elif not isinstance(obj[key], str):
            problems.append(problem(key, "bad_content", f"expected a string, got {_kind(obj[key])}"))
    if not problems and not obj["completion"].strip():
        problems.append(problem("completion", "empty_assistant", "empty completion"))
    if problems:
        return None, problems
    row = {k: v for k, v in obj.items() if k not in ("prompt", "completion")}
    row["messages"] = [
        {"role": "user", "content": obj["prompt"]},
        {"role": "assistant", "content": obj["completion"]},
    ]
    return row, []


def check_rows(problems: Sequence[Problem], on_invalid: str, path: str) -> dict[str, int]:
    """Apply the ``data.on_invalid`` policy to the problems ``read_rows`` found.

    ``error``: raise ``DataError`` listing the first 20 problems and the total when there are
    any. ``skip``: return how many rows were dropped per reason (each invalid row counted once,
    under its first problem's reason); the rows themselves were never returned by
    ``read_rows``.
    """
    if on_invalid not in ON_INVALID:
        raise UserError(f"data.on_invalid: must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
    if not problems:
        return {}
    if on_invalid == "error":
        lines = [str(p) for p in problems[:MAX_LISTED]]
        rows = len({p.line for p in problems})
        if len(problems) > MAX_LISTED:
            lines.append(
                f"... and {len(problems) - MAX_LISTED} more ({len(problems)} problems in total)"
            )
        header = (
            f"{path}: {rows} invalid row{'s' if rows != 1 else ''} "
            "(fix them, or set data.on_invalid: skip to drop them):"
        )
        raise DataError("\n".join([header, *lines]))
    first: dict[int, str] = {}
    for p in problems:
        first.setdefault(p.line, p.reason)
    return dict(Counter(first.values()))


def example_problems(example: Any) -> list[str]:
    """Structural problems of an example (e.g. one a profile returned) as ``field: why``."""
    if not isinstance(example, dict):
        return [f"expected an object, got {_kind(example)}"]
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return ["messages: expected a non-empty array"]
    found = _check_messages(messages, lambda field, _reason, detail: Problem("", 0, field, "", detail))
    return [f"{p.field}: {p.detail}" if p.field else p.detail for p in found]


def example_of(row: dict[str, Any]) -> dict[str, Any]:
    """The row as profiles see it: without the bookkeeping ``_line`` key."""
    return {k: v for k, v in row.items() if k != LINE_KEY}


def split_rows(
    rows: Sequence[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split rows into ``(train, validation)``: a seeded, deterministic random subset.

    The validation part has ``round(len(rows) * fraction)`` rows (at least 1 when
    ``fraction > 0``); both parts keep file order. Uses its own ``random.Random`` seeded from
    a string (stable across processes); the global ``random`` state is untouched.
    """
    if not 0 <= fraction < 1:
        raise UserError(f"data.validation_split: must be >= 0 and < 1, got {fraction}")
    n = len(rows)
    if fraction == 0 or n == 0:
        return list(rows), []
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise UserError(
            f"data.validation_split: {fraction} of {n} row(s) leaves no training rows; "
            "add rows, lower the split or give data.validation"
        )
    order = list(range(n))
    random.Random(f"trainer-split:{seed}").shuffle(order)
    held_out = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in held_out]
    val = [r for i, r in enumerate(rows) if i in held_out]
    return train, val
