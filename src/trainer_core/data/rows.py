"""Reading and validating training JSONL before any model is loaded.

Each line is a JSON object, either ``{"messages": [{"role", "content"}, ...]}`` (other keys such
as ``metadata`` are carried along) or ``{"prompt": str, "completion": str}`` (turned into a user
and an assistant message). Problems are reported as ``file:line: field: why``. Every valid row
keeps its 1-based source line in the ``_line`` key (``LINE_KEY``); strip it with
``example_of(row)`` before handing the row to a profile.

Imports nothing heavy: the CLI validates data with this module before loading torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import stat
import tempfile
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
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
    try:
        with open(path, "rb") as fh:
            rows, problems, _spans = _scan(fh, path, None)
    except OSError as exc:
        raise UserError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    return rows, problems


def _scan(fh: Any, path: str, digest: Any) -> tuple[list[dict[str, Any]], list[Problem],
                                                    array]:
    """Valid rows, problems, and ``(start, end, line)`` of each valid row's bytes in the file;
    ``digest`` (a hashlib object or None) is fed every byte read."""
    rows: list[dict[str, Any]] = []
    problems: list[Problem] = []
    spans = array("q")
    pos = 0
    for number, raw in enumerate(fh, start=1):  # binary: decode per line, one bad byte = one row
        if digest is not None:
            digest.update(raw)
        start, pos = pos, pos + len(raw)
        line = raw
        if number == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
            start += len(_BOM)
        line = line.rstrip(b"\n").removesuffix(b"\r")
        if _read_line(line, path, number, rows, problems):
            spans.extend((start, start + len(line), number))
    return rows, problems, spans


def _read_line(
    line: bytes, path: str, number: int, rows: list[dict[str, Any]], problems: list[Problem]
) -> bool:
    """Parse one line into ``rows`` or ``problems``; True when it gave a row."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(
            Problem(path, number, "", "invalid_utf8", f"invalid UTF-8 at byte offset {exc.start}")
        )
        return False
    if not text.strip():
        return False
    row, row_problems = parse_row(text, path, number)
    if row is None:
        problems.extend(row_problems)
        return False
    row[LINE_KEY] = number
    rows.append(row)
    return True


class Rows(Sequence):
    """The valid rows of one data file, in file order, with an identity for cache keys.

    ``digest`` is a sha256 over the file's bytes, this module's code (which decides what a row
    is) and, for a part (:meth:`select`), the indices taken: equal digests mean equal rows,
    so preprocessing keys on it instead of hashing every row. Rows are held in memory, or,
    when they came from the rows cache (:func:`read_rows_cached`), read back from the file one
    by one when asked for (through a descriptor opened before the file was hashed, so a data
    file replaced meanwhile does not change them). Items are fresh dicts; do not rely on
    mutating them.
    """

    def __init__(self, digest: str, items: list[dict[str, Any]] | None = None,
                 source: _Source | None = None, picks: Sequence[int] | None = None) -> None:
        self.digest = digest
        self._items = items
        self._source = source
        self._picks = picks  # indices into the source's spans (None: all of them)

    def __len__(self) -> int:
        if self._items is not None:
            return len(self._items)
        assert self._source is not None
        return len(self._picks) if self._picks is not None else self._source.count

    def __getitem__(self, key):  # type: ignore[override]
        if self._items is not None:
            return self._items[key]
        if isinstance(key, slice):
            return [self[i] for i in range(len(self))[key]]
        i = range(len(self))[key]  # negative indices, IndexError
        assert self._source is not None
        return self._source.row(self._picks[i] if self._picks is not None else i)

    def select(self, indices: Sequence[int]) -> Rows:
        """The rows at ``indices`` (in that order), with their own digest."""
        digest = hashlib.sha256(f"{self.digest}:select:".encode()
                                + array("q", indices).tobytes()).hexdigest()
        if self._items is not None:
            return Rows(digest, [self._items[i] for i in indices])
        base = self._picks
        return Rows(digest, source=self._source,
                    picks=array("q", indices if base is None else (base[i] for i in indices)))


class _Source:
    """Rows read back from a data file by byte range (the rows cache's view of it)."""

    def __init__(self, path: str, fd: int, spans: array) -> None:
        self.path, self.fd, self.spans = path, fd, spans
        self.count = len(spans) // 3

    def row(self, i: int) -> dict[str, Any]:
        start, end, line = self.spans[3 * i : 3 * i + 3]
        data = os.pread(self.fd, end - start, start)
        row, _problems = parse_row(data.decode("utf-8"), self.path, line)
        if row is None or len(data) != end - start:  # only if the file was changed in place
            raise UserError(f"{self.path}: line {line} changed while the run was reading it")
        row[LINE_KEY] = line
        return row

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, TypeError):
            pass


def _reader_code() -> bytes:
    """This module's source: what a row is depends on it (a changed reader misses every cache)."""
    global _READER_CODE
    if _READER_CODE is None:
        with open(__file__, "rb") as fh:
            _READER_CODE = hashlib.sha256(fh.read()).digest()
    return _READER_CODE


_READER_CODE: bytes | None = None
ROWS_CACHE_VERSION = "1"


def read_rows_cached(path: str, cache_dir: str | os.PathLike | None
                     ) -> tuple[Rows, list[Problem]]:
    """:func:`read_rows` as :class:`Rows`, remembering the outcome under ``cache_dir``.

    The file is hashed (sha256 of its bytes) on every call; when this content was read
    before, the rows are not parsed again: the cache entry (``rows-<key>.bin``: the byte range
    and line of every valid row, and the problems) is read back and rows are parsed from the
    file only when asked for. ``cache_dir`` None: no cache (the file is parsed).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise UserError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    fh = os.fdopen(fd, "rb", closefd=False)
    try:
        digest = hashlib.sha256(f"rows:{ROWS_CACHE_VERSION}:".encode() + _reader_code() + b":")
        entry = None
        if cache_dir is not None:
            inner = hashlib.sha256()
            for block in iter(lambda: fh.read(1 << 20), b""):
                inner.update(block)
            digest.update(inner.digest())
            key = digest.hexdigest()
            entry = Path(cache_dir).expanduser() / f"rows-{key}.bin"
            hit = _load_rows_entry(entry, path)
            if hit is not None:
                spans, problems = hit
                return Rows(key, source=_Source(path, fd, spans)), problems
            fh.seek(0)
            rows, problems, spans = _scan(fh, path, None)
        else:
            inner = hashlib.sha256()
            rows, problems, spans = _scan(fh, path, inner)
            digest.update(inner.digest())
            key = digest.hexdigest()
    except OSError as exc:
        os.close(fd)
        raise UserError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    if entry is not None:
        _store_rows_entry(entry, spans, problems)
    return Rows(key, rows), problems


def _load_rows_entry(entry: Path, path: str) -> tuple[array, list[Problem]] | None:
    try:
        with open(entry, "rb") as fh:
            header = json.loads(fh.readline())
            spans = array("q")
            spans.frombytes(fh.read())
        if len(spans) != 3 * header["rows"]:
            raise ValueError("truncated")
        problems = [Problem(path, *p) for p in header["problems"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # damaged: rebuilt, never fatal
        with contextlib.suppress(OSError):
            entry.unlink()
        return None
    return spans, problems


def _store_rows_entry(entry: Path, spans: array, problems: list[Problem]) -> None:
    header = {"rows": len(spans) // 3,
              "problems": [[p.line, p.field, p.reason, p.detail] for p in problems]}
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-rows-", dir=entry.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(json.dumps(header).encode() + b"\n")
                fh.write(spans.tobytes())
            os.replace(tmp, entry)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:  # a read-only or full cache disk must not stop training
        pass


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
) -> tuple[Sequence[dict[str, Any]], Sequence[dict[str, Any]]]:
    """Split rows into ``(train, validation)``: a seeded, deterministic random subset.

    The validation part has ``round(len(rows) * fraction)`` rows (at least 1 when
    ``fraction > 0``); both parts keep file order (parts of :class:`Rows` are ``Rows``). Uses its own ``random.Random`` seeded from
    a string (stable across processes); the global ``random`` state is untouched.
    """
    if not 0 <= fraction < 1:
        raise UserError(f"data.validation_split: must be >= 0 and < 1, got {fraction}")
    n = len(rows)
    if fraction == 0 or n == 0:
        return (rows if isinstance(rows, Rows) else list(rows)), []
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise UserError(
            f"data.validation_split: {fraction} of {n} row(s) leaves no training rows; "
            "add rows, lower the split or give data.validation"
        )
    order = list(range(n))
    random.Random(f"trainer-split:{seed}").shuffle(order)
    held_out = set(order[:n_val])
    if isinstance(rows, Rows):  # parts keep an identity (and are not parsed yet)
        return (rows.select([i for i in range(n) if i not in held_out]),
                rows.select(sorted(held_out)))
    train = [r for i, r in enumerate(rows) if i not in held_out]
    val = [r for i, r in enumerate(rows) if i in held_out]
    return train, val
