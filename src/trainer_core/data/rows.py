"""Reading and validating training data before any model is loaded.

A data file is JSONL (one JSON object a line), a ``.json`` array, Parquet, CSV/TSV or a
``datasets.save_to_disk`` folder (``data.kinds``); each record is read in a row format
(``data.formats``: messages, prompt/completion, ShareGPT, Alpaca, with ``data.columns`` and
``data.roles``) and comes out as ``{"messages": [{"role", "content"}, ...], ...}`` (other
keys such as ``metadata`` are carried along). Problems are reported as ``file:line: field:
why`` (``file: row index N: ...`` for Parquet/Arrow). Every valid row keeps its 1-based
source line in the ``_line`` key (``LINE_KEY``), or its 0-based row index in ``_row``
(``ROW_KEY``); strip them with ``example_of(row)`` before handing the row to a profile.

Imports nothing heavy: the CLI validates data with this module before loading torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import stat
import sys
import tempfile
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from trainer_core.data import kinds
from trainer_core.data.formats import ROLES, RowFormat, check_messages, file_format, kind_name
from trainer_core.data.formats import normalise as normalise_record
from trainer_core.errors import DataError, UserError

__all__ = ["LINE_KEY", "ROLES", "ROW_KEY", "Problem", "RowFormat", "Rows", "check_data_file",
           "check_rows", "example_of", "example_problems", "parse_row", "read_rows",
           "read_rows_cached", "row_where", "split_rows"]

LINE_KEY = "_line"
ROW_KEY = "_row"
MAX_LISTED = 20
ON_INVALID = ("error", "skip")
#: Rows nest messages two or three levels deep; metadata may add some. Deeper is refused.
MAX_DEPTH = 64
_BOM = b"\xef\xbb\xbf"


@attrs.frozen
class Problem:
    """One problem with one line of a data file.

    ``reason`` is a short stable key (``not_json``, ``unknown_role``...) used to count skipped
    rows; ``field`` is a dotted path inside the row (empty for the whole line). ``line`` is a
    row index when ``unit`` is ``"row"`` (Parquet and Arrow data).
    """

    path: str
    line: int
    field: str
    reason: str
    detail: str
    unit: str = "line"

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        at = f": row index {self.line}" if self.unit == "row" else f":{self.line}"
        return f"{self.path}{at}: {where}{self.detail}"


_kind = kind_name


def row_where(row: dict[str, Any], source: str, index: int) -> str:
    """``file:line``, ``file: row index N`` (Parquet/Arrow) or ``file: row N`` (rows that came
    from no file): how messages name a row."""
    if row.get(LINE_KEY):
        return f"{source}:{row[LINE_KEY]}"
    if row.get(ROW_KEY) is not None:
        return f"{source}: row index {row[ROW_KEY]}"
    return f"{source}: row {index + 1}"


class _Reading:
    """The row format while one file is read: ``auto`` is fixed by the first valid record."""

    def __init__(self, fmt: RowFormat | None) -> None:
        self.fmt = fmt if fmt is not None else RowFormat()

    def row(self, obj: Any, text_cells: bool = False
            ) -> tuple[dict[str, Any] | None, list[tuple[str, str, str]]]:
        row, found, name = normalise_record(obj, self.fmt, text_cells)
        if row is not None and self.fmt.format == "auto" and name is not None:
            self.fmt = self.fmt.fixed(file_format(name))
        return row, found


def read_rows(path: str, fmt: RowFormat | None = None
              ) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Read a data file (any kind ``data.kinds`` knows) into valid rows and the problems of
    the invalid ones.

    JSONL: blank lines are skipped; a UTF-8 BOM and CRLF line ends are accepted. Valid rows
    come back in file order as ``{"messages": [...], ..., "_line": N}`` (``"_row": N`` for
    Parquet/Arrow); other row formats are converted to messages (``fmt``: ``data.format``,
    ``data.columns``, ``data.roles``; default auto-detected). Raises ``UserError`` only when
    the file cannot be read at all.
    """
    kind = kinds.kind_of(path)
    reading = _Reading(fmt)
    if kind != "jsonl":
        rows, problems, _spans = _scan_records(path, kind, kinds.read_blobs(path, kind), reading)
        return rows, problems
    try:
        with open(path, "rb") as fh:
            rows, problems, _spans = _scan(fh, path, None, reading)
    except OSError as exc:
        raise UserError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    return rows, problems


def _scan_records(path: str, kind: str, blobs: list[tuple[str, bytes]], reading: _Reading
                  ) -> tuple[list[dict[str, Any]], list[Problem], array]:
    """:func:`_scan` for the kinds read whole (``data.kinds``): spans are ``(record index, 0,
    number)``."""
    unit = kinds.UNITS[kind]
    key = ROW_KEY if unit == "row" else LINE_KEY
    text_cells = kind in ("csv", "tsv")
    rows: list[dict[str, Any]] = []
    problems: list[Problem] = []
    spans = array("q")
    for i, (number, record) in enumerate(kinds.records(path, kind, blobs)):
        if isinstance(record, tuple):  # a CSV row that is no record
            problems.append(Problem(path, number, *record, unit=unit))
            continue
        bad = _unreadable_value(record)
        if bad is not None:
            problems.append(Problem(path, number, *bad, unit=unit))
            continue
        row, found = reading.row(record, text_cells)
        if row is None:
            problems.extend(Problem(path, number, *f, unit=unit) for f in found)
            continue
        row[key] = number
        rows.append(row)
        spans.extend((i, 0, number))
    return rows, problems, spans


def _scan(fh: Any, path: str, digest: Any, reading: _Reading
          ) -> tuple[list[dict[str, Any]], list[Problem], array]:
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
        if _read_line(line, path, number, rows, problems, reading):
            spans.extend((start, start + len(line), number))
    return rows, problems, spans


def _read_line(line: bytes, path: str, number: int, rows: list[dict[str, Any]],
               problems: list[Problem], reading: _Reading) -> bool:
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
    row, row_problems = _parse(text, path, number, reading)
    if row is None:
        problems.extend(row_problems)
        return False
    row[LINE_KEY] = number
    rows.append(row)
    return True


class Rows(Sequence):
    """The valid rows of one data file, in file order, with an identity for cache keys.

    ``digest`` is a sha256 over the file's bytes, the row format, this package's reading code
    (which decides what a row is) and, for a part (:meth:`select`), the indices taken: equal
    digests mean equal rows, so preprocessing keys on it instead of hashing every row. Rows
    are held in memory, or, when they came from the rows cache (:func:`read_rows_cached`),
    read back when asked for: JSONL rows one by one from the file (through a descriptor opened
    before the file was hashed, so a data file replaced meanwhile does not change them), the
    other kinds by reading the data again on the first access (checked against the digest).
    Items are fresh dicts; do not rely on mutating them.
    """

    def __init__(self, digest: str, items: list[dict[str, Any]] | None = None,
                 source: _Source | _RecordSource | None = None,
                 picks: Sequence[int] | None = None) -> None:
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

    def preload(self) -> None:
        """Read what rows are read back from now (before forking workers, which then share
        it instead of each reading the whole file again)."""
        if isinstance(self._source, _RecordSource):
            self._source.load()

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
    """JSONL rows read back from the data file by byte range (the rows cache's view of it)."""

    def __init__(self, path: str, fd: int, spans: array, fmt: RowFormat) -> None:
        self.path, self.fd, self.spans, self.fmt = path, fd, spans, fmt
        self.count = len(spans) // 3

    def row(self, i: int) -> dict[str, Any]:
        start, end, line = self.spans[3 * i : 3 * i + 3]
        data = os.pread(self.fd, end - start, start)
        row, _problems = parse_row(data.decode("utf-8"), self.path, line, self.fmt)
        if row is None or len(data) != end - start:  # only if the file was changed in place
            raise UserError(f"{self.path}: line {line} changed while the run was reading it")
        row[LINE_KEY] = line
        return row

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, TypeError):
            pass


class _RecordSource:
    """Rows of the kinds read whole (Parquet, CSV...), read again on first access."""

    def __init__(self, path: str, kind: str, spans: array, fmt: RowFormat, content: bytes
                 ) -> None:
        self.path, self.kind, self.spans, self.fmt, self.content = path, kind, spans, fmt, content
        self.count = len(spans) // 3
        self.records: dict[int, dict[str, Any]] | None = None

    def load(self) -> dict[int, dict[str, Any]]:
        if self.records is None:
            blobs = kinds.read_blobs(self.path, self.kind)
            if _content_digest(blobs) != self.content:
                raise UserError(f"{self.path}: changed while the run was reading it")
            self.records = {i: r for i, (_n, r) in enumerate(
                kinds.records(self.path, self.kind, blobs)) if isinstance(r, dict)}
        return self.records

    def row(self, i: int) -> dict[str, Any]:
        index, _zero, number = self.spans[3 * i : 3 * i + 3]
        row, _found, _name = normalise_record(self.load()[index], self.fmt,
                                              self.kind in ("csv", "tsv"))
        assert row is not None  # the same bytes and format gave a valid row before
        row[ROW_KEY if kinds.UNITS[self.kind] == "row" else LINE_KEY] = number
        return row


def _content_digest(blobs: list[tuple[str, bytes]]) -> bytes:
    inner = hashlib.sha256()
    for name, data in blobs:
        inner.update(f"{name}:{len(data)}:".encode())
        inner.update(data)
    return inner.digest()


def _reader_code() -> bytes:
    """The reading code's source (this module, ``formats``, ``kinds``): what a row is depends
    on it (a changed reader misses every cache)."""
    global _READER_CODE
    if _READER_CODE is None:
        digest = hashlib.sha256()
        for module in (__file__, kinds.__file__, sys.modules[RowFormat.__module__].__file__):
            with open(str(module), "rb") as fh:
                digest.update(fh.read())
        _READER_CODE = digest.digest()
    return _READER_CODE


_READER_CODE: bytes | None = None
ROWS_CACHE_VERSION = "2"


def read_rows_cached(path: str, cache_dir: str | os.PathLike | None,
                     fmt: RowFormat | None = None) -> tuple[Rows, list[Problem]]:
    """:func:`read_rows` as :class:`Rows`, remembering the outcome under ``cache_dir``.

    The data is hashed (sha256 of its bytes) on every call; when this content was read
    before in this row format, the rows are not parsed again: the cache entry
    (``rows-<key>.bin``: the position and line/row index of every valid row, the problems and
    the detected format) is read back and rows are parsed only when asked for.
    ``cache_dir`` None: no cache (the data is parsed).
    """
    fmt = fmt if fmt is not None else RowFormat()
    kind = kinds.kind_of(path)
    digest = hashlib.sha256(f"rows:{ROWS_CACHE_VERSION}:".encode() + _reader_code() + b":"
                            + fmt.identity() + b":")
    if kind != "jsonl":
        blobs = kinds.read_blobs(path, kind)
        content = _content_digest(blobs)
        digest.update(content)
        key = digest.hexdigest()
        entry = None if cache_dir is None else Path(cache_dir).expanduser() / f"rows-{key}.bin"
        hit = None if entry is None else _load_rows_entry(entry, path, kinds.UNITS[kind])
        if hit is not None:
            spans, problems, fixed = hit
            return Rows(key, source=_RecordSource(path, kind, spans, fixed, content)), problems
        reading = _Reading(fmt)
        rows, problems, spans = _scan_records(path, kind, blobs, reading)
        if entry is not None:
            _store_rows_entry(entry, spans, problems, reading.fmt)
        return Rows(key, rows), problems
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise UserError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    fh = os.fdopen(fd, "rb", closefd=False)
    reading = _Reading(fmt)
    try:
        entry = None
        if cache_dir is not None:
            inner = hashlib.sha256()
            for block in iter(lambda: fh.read(1 << 20), b""):
                inner.update(block)
            digest.update(inner.digest())
            key = digest.hexdigest()
            entry = Path(cache_dir).expanduser() / f"rows-{key}.bin"
            hit = _load_rows_entry(entry, path, "line")
            if hit is not None:
                spans, problems, fixed = hit
                return Rows(key, source=_Source(path, fd, spans, fixed)), problems
            fh.seek(0)
            rows, problems, spans = _scan(fh, path, None, reading)
        else:
            inner = hashlib.sha256()
            rows, problems, spans = _scan(fh, path, inner, reading)
            digest.update(inner.digest())
            key = digest.hexdigest()
    except OSError as exc:
        os.close(fd)
        raise UserError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    if entry is not None:
        _store_rows_entry(entry, spans, problems, reading.fmt)
    return Rows(key, rows), problems


def _load_rows_entry(entry: Path, path: str, unit: str
                     ) -> tuple[array, list[Problem], RowFormat] | None:
    try:
        with open(entry, "rb") as fh:
            header = json.loads(fh.readline())
            spans = array("q")
            spans.frombytes(fh.read())
        if len(spans) != 3 * header["rows"]:
            raise ValueError("truncated")
        problems = [Problem(path, *p, unit=unit) for p in header["problems"]]
        fmt, columns, roles = header["format"]
        fixed = RowFormat(fmt, tuple(map(tuple, columns)), tuple(map(tuple, roles)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # damaged: rebuilt, never fatal
        with contextlib.suppress(OSError):
            entry.unlink()
        return None
    return spans, problems, fixed


def _store_rows_entry(entry: Path, spans: array, problems: list[Problem], fixed: RowFormat
                      ) -> None:
    header = {"rows": len(spans) // 3,
              "problems": [[p.line, p.field, p.reason, p.detail] for p in problems],
              # the format "auto" was fixed to: rows read back later are read in it
              "format": json.loads(fixed.identity())}
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


def parse_row(text: str, path: str, line: int, fmt: RowFormat | None = None
              ) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Parse and validate one JSONL line; returns ``(row, [])`` or ``(None, problems)``.
    ``fmt``: the row format (default: auto-detected from this row alone)."""
    return _parse(text, path, line, _Reading(fmt))


def _parse(text: str, path: str, line: int, reading: _Reading
           ) -> tuple[dict[str, Any] | None, list[Problem]]:
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
        return None, [problem(*bad)]
    row, found = reading.row(obj)
    return row, [problem(*f) for f in found]


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
    """Refuse what is not readable data (a directory other than a save_to_disk folder, a FIFO,
    ``/dev/null``) with one line naming the config field; reading a FIFO would block."""
    p = str(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UserError(f"{field}: {p}: file not found") from None
    except OSError as exc:
        raise UserError(f"{field}: {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            kinds.arrow_files(p)
        except UserError as exc:
            raise UserError(f"{field}: {exc}") from None
        return
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{field}: {p} is not a regular file (a FIFO or device); give a data "
                        "file")
    if st.st_size == 0:
        raise UserError(f"{field}: {p} is empty")


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
    return [f"{field}: {detail}" if field else detail
            for field, _reason, detail in check_messages(messages)]


def example_of(row: dict[str, Any]) -> dict[str, Any]:
    """The row as profiles see it: without the bookkeeping ``_line``/``_row`` keys."""
    return {k: v for k, v in row.items() if k not in (LINE_KEY, ROW_KEY)}


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
