"""File kinds: the records of a ``.json`` array, ``.parquet``, ``.csv``/``.tsv`` file or a
``datasets.save_to_disk`` folder (JSONL is read line by line in ``data.rows``).

Each reader takes the file's bytes (read once, so what was hashed is what is parsed) and
yields ``(number, record)``: ``number`` is the record's first line for text kinds and its
0-based row index for Parquet/Arrow (``UNITS``); ``record`` is a dict, or, for a CSV row that
cannot be one (a wrong number of cells), a ``(field, reason, detail)`` problem.

Libraries made for each kind do the parsing: pyarrow (the ``parquet`` extra) for Parquet and
Arrow, the standard library's ``json`` and ``csv``. The ``csv`` module rather than pyarrow's CSV
reader because it tells each record's line (pyarrow's does not) and keeps every cell as text
(pyarrow would turn a completion of ``"42"`` into a number).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer_core.errors import UserError

#: File suffix -> kind; anything else is read as JSONL. The daemon's inbox takes these too.
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
            ".tsv": "tsv"}
DATA_SUFFIXES = tuple(SUFFIXES)
#: How a kind numbers its records in messages: by line (text) or by 0-based row index.
UNITS = {"jsonl": "line", "json": "line", "csv": "line", "tsv": "line", "parquet": "row",
         "arrow": "row"}
#: A folder written by ``Dataset.save_to_disk`` holds this file; a ``DatasetDict`` the other.
ARROW_STATE, ARROW_SPLITS = "state.json", "dataset_dict.json"
PARQUET_HINT = "pip install 'trainer-core[parquet]'"


def kind_of(path: str | os.PathLike) -> str:
    """``jsonl``, ``json``, ``parquet``, ``csv``, ``tsv`` or ``arrow`` (a save_to_disk folder)."""
    p = Path(path)
    if p.is_dir():
        return "arrow"
    kind = SUFFIXES.get(p.suffix.lower(), "jsonl")
    if kind == "json":  # many exports write JSON Lines under a .json name
        try:
            with open(p, "rb") as fh:
                head = fh.read(1 << 12).removeprefix(b"\xef\xbb\xbf").lstrip()
        except OSError:
            return kind  # reported when it is read
        if head and not head.startswith(b"["):
            return "jsonl"
    return kind


def is_data_file(path: str | os.PathLike) -> bool:
    """Whether a file's name is one of the accepted kinds (what the daemon's inbox takes)."""
    return Path(path).suffix.lower() in SUFFIXES


def arrow_files(folder: str | os.PathLike) -> list[Path]:
    """The Arrow files of a save_to_disk folder, in row order (from its ``state.json``)."""
    d = Path(folder)
    if (d / ARROW_SPLITS).is_file() and not (d / ARROW_STATE).is_file():
        try:
            splits = json.loads((d / ARROW_SPLITS).read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = []
        first = f"{d / splits[0]}" if splits else f"{d}/<split>"
        raise UserError(f"{d}: a DatasetDict with splits {', '.join(map(str, splits))}; give one "
                        f"split's folder, e.g. {first}")
    try:
        state = json.loads((d / ARROW_STATE).read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except FileNotFoundError:
        raise UserError(f"{d} is a directory but not one written by datasets' save_to_disk "
                        f"(no {ARROW_STATE}); give a data file or such a folder") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{d / ARROW_STATE}: not a save_to_disk state file ({exc!r})") from None
    files = []
    for name in names:
        f = d / name
        if not isinstance(name, str) or Path(name).name != name or not f.is_file():
            raise UserError(f"{d / ARROW_STATE}: data file {name!r} not found in {d}")
        files.append(f)
    return files


def read_blobs(path: str | os.PathLike, kind: str) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every file the data consists of (one, or a folder's Arrow files)."""
    files = arrow_files(path) if kind == "arrow" else [Path(path)]
    out = []
    for f in files:
        try:
            out.append((f.name, f.read_bytes()))
        except OSError as exc:
            raise UserError(f"cannot read data file {f}: {exc.strerror or exc}") from None
    return out


def records(path: str, kind: str, blobs: list[tuple[str, bytes]]
            ) -> Iterator[tuple[int, Any]]:
    """The records of non-JSONL data, numbered (see the module doc)."""
    if kind == "json":
        return _json_array(path, blobs[0][1])
    if kind in ("csv", "tsv"):
        return _csv(path, blobs[0][1], "\t" if kind == "tsv" else ",")
    return _arrow(path, kind, blobs)


def pyarrow() -> Any:
    """pyarrow, or a one-line ``UserError`` saying how to install it."""
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(f"reading Parquet or Arrow data needs pyarrow: {PARQUET_HINT}") from None
    return pa


def _arrow(path: str, kind: str, blobs: list[tuple[str, bytes]]) -> Iterator[tuple[int, Any]]:
    pa = pyarrow()
    index = 0
    for name, data in blobs:
        try:
            if kind == "parquet":
                batches = pa.parquet.ParquetFile(pa.BufferReader(data)).iter_batches()
            else:  # save_to_disk writes Arrow IPC streams
                batches = iter(pa.ipc.open_stream(pa.BufferReader(data)))
            for batch in batches:
                for record in batch.to_pylist():
                    # A null cell is an absent column, as a key missing from a JSONL row.
                    yield index, {k: v for k, v in record.items() if v is not None}
                    index += 1
        except (pa.ArrowException, OSError) as exc:
            where = path if kind == "parquet" else f"{path}/{name}"
            raise UserError(f"{where}: not a readable {'Parquet' if kind == 'parquet' else 'Arrow'}"
                            f" file: {exc}") from None


def _json_array(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    """Each element of the top-level array, with the line it starts on."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 at byte offset {exc.start}") from None
    decoder = json.JSONDecoder()
    pos, n = 0, len(text)
    line, counted = 1, 0  # the line ``counted`` is on; advanced as the elements are read

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    pos = skip(pos)
    if pos >= n or text[pos] != "[":
        raise UserError(f"{path}:{line_at(pos)}: expected a JSON array of rows (or JSON Lines)")
    pos = skip(pos + 1)
    if pos < n and text[pos] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg} (a "
                            "broken array cannot be split into rows)") from None
        except RecursionError:
            raise UserError(f"{path}:{line_at(pos)}: nested too deeply") from None
        except ValueError as exc:  # an integer of more than 4300 digits
            raise UserError(f"{path}:{line_at(pos)}: not accepted: {exc}") from None
        yield line_at(pos), obj
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < n and text[pos] == "]" and skip(pos + 1) == n:
            return
        raise UserError(f"{path}:{line_at(pos)}: expected ',' or the closing ']' of the array")


def _csv(path: str, data: bytes, delimiter: str) -> Iterator[tuple[int, Any]]:
    """Rows as ``{header: cell}``; the first row is the header. Bytes that are not UTF-8 reach
    the row as lone surrogates, which the row check reports on that line."""
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    # The default limit (128 KiB a cell) is below a long conversation's JSON.
    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise UserError(f"{path}:1: cannot read the header: {exc}") from None
    seen = set()
    for name in header:
        if not name or name in seen:
            raise UserError(f"{path}:1: the header has {'an empty' if not name else 'a repeated'}"
                            f" column name{f' {name!r}' if name else ''}")
        seen.add(name)
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, ("", "bad_csv", f"not a CSV row: {exc}")
            continue
        if not cells:  # a blank line
            continue
        if len(cells) != len(header):
            yield start, ("", "bad_csv", f"expected {len(header)} cells (the header's), got "
                          f"{len(cells)}")
            continue
        yield start, dict(zip(header, cells, strict=True))
