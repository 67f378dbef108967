"""Validated rows -> tokenized training examples (flat arrays), cached.

Per row ``i``: the profile prepares it (its system prompt applied, then ``transform`` with
``random.Random(derive_seed(seed, i))``), ``validate`` checks the result, and rows with problems
follow ``data.on_invalid`` (``error``: stop, listing them; ``skip``: drop and count them as
``profile_invalid``); rows whose message content holds the tokenizer's control tokens follow
``data.special_tokens_in_content``; then the conversation is rendered and labelled (the rule of
``trainer_core.data.chat.encode``). Rows longer than ``max_length`` are dropped (or, when the
user opted in, truncated after their last complete assistant turn); rows with no trained token
are dropped. Every drop is counted by reason in the stats.

Fast path: rows are rendered one by one but tokenized many per call and labelled with array
operations over the whole batch; large inputs are split into contiguous chunks handled by
several forked processes. Tokenizing goes through the word cache (``data.words``: each
distinct word encoded once, for byte-level BPE tokenizers such as Qwen's) and otherwise the
fast tokenizer's Rust ``encode_batch`` with offsets. The result is identical to ``encode`` row
by row (tests compare them); slow (non-"fast") tokenizers and truncated rows take the per-row
path.

The result (:class:`Tokenized`) is cached on disk under ``<cache_dir>/<key>/`` as flat ``.npy``
arrays read back memory-mapped, where ``key`` is a sha256 of every input that changes it (rows
- for :class:`~trainer_core.data.rows.Rows`, their digest: the data file's sha256 -, profile
name/version/options/date, tokenizer, template text, max_length, truncation, seed,
special-token and on_invalid policies, ``PREPROCESS_VERSION``). Entries are written to a temporary folder and renamed into place, so a
crash or a concurrent run never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import multiprocessing
import os
import random
import shutil
import tempfile
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from trainer_core.data.chat import (
    IGNORE_INDEX,
    ChatTemplate,
    encode,
    render_with_spans,
    resolve_template,
    truncate,
)
from trainer_core.data.rows import (
    LINE_KEY,
    ON_INVALID,
    Rows,
    example_of,
    example_problems,
    row_where,
)
from trainer_core.data.words import WordEncoder
from trainer_core.errors import DataError, UserError
from trainer_core.files import cache_root

#: Bump whenever this module's output changes for the same inputs (invalidates all caches).
# 2 (main): the core applies Profile.system_prompt; 2 (issue 12): flat .npy arrays instead of
# a datasets cache. 3: both.
PREPROCESS_VERSION = "3"
COLUMNS = ("input_ids", "labels", "length", "num_trained", "line")
MAX_REPORTED = 20
#: Rows rendered per tokenizer call: large enough to amortise the call, small enough to keep
#: a batch's character arrays in cache.
BATCH_ROWS = 256
#: Below this many rows, ``workers=None`` stays in one process (forking costs ~0.1 s).
MIN_ROWS_PER_WORKER = 1024
_ARRAYS = ("input_ids", "trained", "offsets", "num_trained", "line")


def derive_seed(seed: int, index: int) -> int:
    """The seed of example ``index``'s private RNG: stable across processes and Python runs
    (sha256, not ``hash()``, which is salted per process)."""
    digest = hashlib.sha256(f"trainer:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def example_rng(seed: int, index: int) -> random.Random:
    """The ``random.Random`` a profile's ``transform`` gets for example ``index``."""
    return random.Random(derive_seed(seed, index))


@attrs.define
class PreprocessStats:
    """What preprocessing did, for the run summary.

    ``dropped`` counts rows by reason: ``profile_invalid`` (problems the profile's ``validate``
    found in the transformed row, or a malformed transform result), ``special_token`` (control
    tokens in message content), ``too_long``, ``no_trained_tokens``. ``truncated`` counts kept
    rows that were cut. ``problems`` holds the first profile problems as ``file:line: why``,
    then the first special-token hits.
    """

    rows_in: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = attrs.field(factory=dict)
    truncated: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    cache_hit: bool = False
    cache_key: str = ""
    problems: list[str] = attrs.field(factory=list)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def default_cache_dir() -> Path:
    """``$TRAINER_CACHE/preprocess``, or ``~/.cache/trainer/preprocess``."""
    return cache_root() / "preprocess"


def cache_key(
    rows: Sequence[dict[str, Any]],
    profile: Any,
    tokenizer: Any,
    template: ChatTemplate,
    max_length: int,
    seed: int,
    truncation: bool,
    special_tokens: str = "reject",
    on_invalid: str = "error",
) -> str:
    """sha256 over everything that changes the preprocessed result."""
    from trainer_core.data.tokenizer import tokenizer_fingerprint

    digest = hashlib.sha256()
    header = {
        "preprocess_version": PREPROCESS_VERSION,
        "profile": [
            profile.name,
            profile.version,
            f"{type(profile).__module__}.{type(profile).__qualname__}",
            profile.options_dict(),
            profile.today.isoformat(),
        ],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template.identity(),
        "max_length": max_length,
        "seed": seed,
        "truncation": truncation,
        "special_tokens": special_tokens,
        "on_invalid": on_invalid,
    }
    digest.update(json.dumps(header, sort_keys=True, default=repr).encode())
    if isinstance(rows, Rows):  # rows of a data file: their digest stands for them
        digest.update(b"rows:" + rows.digest.encode())
        return digest.hexdigest()
    # All rows at once (line numbers included: they are stored in the "line" column). marshal
    # format 2 has no back-references, so equal rows give equal bytes; it is ~4x faster than
    # JSON, which stays the fallback for values marshal does not know.
    try:
        digest.update(b"marshal2:" + marshal.dumps(list(rows), 2))
    except ValueError:
        text = json.dumps(list(rows), sort_keys=True, ensure_ascii=False, default=repr)
        digest.update(b"json:" + text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


class Tokenized:
    """Preprocessed examples as flat arrays (what :func:`preprocess` returns and caches).

    ``input_ids`` holds every kept example's tokens back to back, ``trained`` one flag per token
    (its label is the token itself, else ``IGNORE_INDEX``), ``offsets[i]:offsets[i + 1]`` is
    example ``i``'s range; ``num_trained`` and ``line`` (source line, 0 when unknown) are per
    example. Arrays may be memory-mapped from the cache: nothing is read before it is used.

    Read it like a small ``datasets.Dataset``: ``len(t)``, ``t[i]`` (a dict of the columns in
    ``COLUMNS``), ``t["line"]`` (a column as a list), ``t.to_dict()``; :meth:`examples` is the
    view training uses.
    """

    column_names = list(COLUMNS)

    def __init__(self, input_ids: np.ndarray, trained: np.ndarray, offsets: np.ndarray,
                 num_trained: np.ndarray, line: np.ndarray) -> None:
        self.input_ids = input_ids
        self.trained = trained
        self.offsets = offsets
        self.num_trained = num_trained
        self.line = line

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def ids(self, i: int) -> list[int]:
        return self.input_ids[self.offsets[i] : self.offsets[i + 1]].tolist()

    def labels(self, i: int) -> list[int]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.where(self.trained[a:b], self.input_ids[a:b], IGNORE_INDEX).tolist()

    def example(self, i: int) -> dict[str, list[int]]:
        """``{"input_ids": [...], "labels": [...]}`` of example ``i`` (fresh lists)."""
        return {"input_ids": self.ids(i), "labels": self.labels(i)}

    def examples(self) -> Examples:
        return Examples(self)

    def column(self, name: str) -> list:
        if name == "input_ids":
            return [self.ids(i) for i in range(len(self))]
        if name == "labels":
            return [self.labels(i) for i in range(len(self))]
        if name == "length":
            return np.diff(self.offsets).tolist()
        if name in ("num_trained", "line"):
            return getattr(self, name).tolist()
        raise KeyError(name)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self.column(key)
        i = range(len(self))[key]  # negative indices, IndexError
        return {"input_ids": self.ids(i), "labels": self.labels(i),
                "length": int(self.offsets[i + 1] - self.offsets[i]),
                "num_trained": int(self.num_trained[i]), "line": int(self.line[i])}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def to_dict(self) -> dict[str, list]:
        return {name: self.column(name) for name in COLUMNS}

    def save(self, folder: Path) -> None:
        for name in _ARRAYS:
            np.save(folder / f"{name}.npy", getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, stats: PreprocessStats) -> Tokenized:
        """Memory-map a saved entry; raises ``ValueError`` when it does not match ``stats``."""
        arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False,
                                # numpy cannot map an empty array
                                mmap_mode="r" if stats.rows_kept else None)
                  for name in _ARRAYS}
        out = cls(**arrays)
        n, tokens = stats.rows_kept, stats.total_tokens
        if (len(out.offsets) != n + 1 or len(out.num_trained) != n or len(out.line) != n
                or len(out.input_ids) != tokens or len(out.trained) != tokens
                or int(out.offsets[-1]) != tokens):
            raise ValueError(f"damaged preprocessing cache entry {folder}")
        return out


class Examples(Sequence):
    """Training's view of a :class:`Tokenized`: item ``i`` is ``{"input_ids", "labels"}`` as
    lists, built on access (a 100k-row cache is ready without materialising every list)."""

    def __init__(self, data: Tokenized) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return [self.data.example(i) for i in range(len(self.data))[key]]
        return self.data.example(range(len(self.data))[key])


def preprocess(
    rows: Sequence[dict[str, Any]],
    profile: Any,
    tokenizer: Any,
    template: str | ChatTemplate = "chatml",
    max_length: int = 2048,
    seed: int = 42,
    truncation: bool = False,
    cache_dir: str | os.PathLike | None = None,
    *,
    use_cache: bool = True,
    source: str = "data",
    on_invalid: str = "skip",
    special_tokens: str = "reject",
    workers: int | None = None,
) -> tuple[Tokenized, PreprocessStats]:
    """Transform, validate, encode and filter ``rows`` (from ``data.read_rows``); cached.

    Returns ``(examples, stats)``: a :class:`Tokenized` with columns ``input_ids``, ``labels``,
    ``length``, ``num_trained`` and ``line`` (source line, 0 when unknown), in row order.
    ``cache_dir`` defaults to ``default_cache_dir()``; ``source`` names the data in problem
    messages. ``workers``: processes for a cold run (``None``: one per available core, at most
    4, when there are at least ``MIN_ROWS_PER_WORKER`` rows per process; the result does not
    depend on it). ``stats.cache_hit`` tells whether the result came from the cache (no
    transform ran).
    ``on_invalid="error"`` raises ``DataError`` listing the rows the profile rejected (the
    run passes ``data.on_invalid``); ``"skip"`` drops them.

    ``special_tokens`` is the ``data.special_tokens_in_content`` policy: ``reject`` treats a
    message whose content contains one of the tokenizer's control tokens (``<|im_end|>``...)
    as an invalid row (``on_invalid``: ``error`` raises ``DataError`` naming each line and
    token, ``skip`` drops it as ``special_token``); ``allow`` tokenizes them as control tokens.
    """
    if max_length <= 0:
        raise UserError(f"max_length: must be > 0, got {max_length}")
    if on_invalid not in ON_INVALID:
        raise UserError(f"data.on_invalid: must be one of {', '.join(ON_INVALID)}, "
                        f"got {on_invalid!r}")
    tpl = resolve_template(template, tokenizer)
    if special_tokens not in ("reject", "allow"):
        raise UserError(f"data.special_tokens_in_content: must be reject or allow, got "
                        f"{special_tokens!r}")
    key = cache_key(rows, profile, tokenizer, tpl, max_length, seed, truncation, special_tokens,
                    on_invalid)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = root / key
    if use_cache:
        cached = _load(entry)
        if cached is not None:
            _check_rejected(cached[1], on_invalid, profile, source)
            return cached
    from trainer_core.data.tokenizer import materialized, special_token_texts

    if not (tpl.is_chatml and not truncation and _fast_backend(tokenizer) is not None):
        # Rendering with a Jinja template, truncating and the per-row path use the
        # tokenizer itself: load it once here, not in every worker.
        tokenizer = materialized(tokenizer)
    job = _Job(rows, profile, tokenizer, tpl, max_length, seed, truncation, source,
               on_invalid=on_invalid)
    if special_tokens == "reject":

        job.controls = special_token_texts(tokenizer)
    result, stats = _compute(job, _worker_count(workers, len(rows)))
    stats.cache_key = key
    if use_cache:  # stored either way: the policy is applied to the stats, cached or not
        try:
            _store(entry, result, stats)
        except OSError as exc:  # a read-only or full cache disk must not stop training
            warnings.warn(f"preprocessing cache not written to {entry}: {exc}", stacklevel=2)
    _check_rejected(stats, on_invalid, profile, source)
    return result, stats


def _check_rejected(stats: PreprocessStats, on_invalid: str, profile: Any, source: str) -> None:
    """``data.on_invalid = "error"``: rows the profile rejected stop the run, listed by line."""
    rejected = stats.dropped.get("profile_invalid", 0)
    if on_invalid != "error" or not rejected:
        return
    lines = list(stats.problems)
    if len(lines) >= MAX_REPORTED:
        lines.append(f"... (the first {MAX_REPORTED} problems are shown)")
    header = (f"{source}: {rejected} row{'s' if rejected != 1 else ''} rejected by profile "
              f"{profile.name!r} (fix them, or set data.on_invalid: skip to drop them):")
    raise DataError("\n".join([header, *lines]))


def prepare_row(profile: Any, row: dict[str, Any], index: int, seed: int, where: str
                ) -> tuple[dict[str, Any], list[str]]:
    """Row ``index`` as the profile prepares it (system prompt, ``transform`` with the row's
    rng) and its problems (structural ones of the result, then the profile's ``validate``).

    An exception from the profile is a ``UserError`` naming ``where`` (``file:line``) and the
    profile (the cause is chained for ``--debug``); a ``UserError`` it raises keeps its text.
    """
    try:
        example = profile.prepare(example_of(row), index, example_rng(seed, index))
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from exc
    except Exception as exc:  # a plugin bug; name the row, keep the cause for --debug
        raise UserError(
            f"{where}: profile {profile.name!r} failed to transform the row: {exc!r}"
        ) from exc
    problems = example_problems(example)
    if problems:
        return example, problems
    try:
        found = profile.validate(example)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from exc
    except Exception as exc:  # a plugin bug: one line naming the row, the profile and its plugin
        from trainer_core.plugins.registry import profile_plugin_name

        raise UserError(f"{where}: profile {profile.name!r} (plugin "
                        f"{profile_plugin_name(profile)!r}) failed to validate the row: "
                        f"{exc!r}") from exc
    if isinstance(found, str):  # a single message instead of a list
        found = [found]
    return example, [str(p) for p in (found or [])]


def _worker_count(workers: int | None, n_rows: int) -> int:
    if workers is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        workers = min(cores, 4, n_rows // MIN_ROWS_PER_WORKER)
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1  # workers inherit the tokenizer and the profile; without fork, stay in-process
    return max(1, workers)


@attrs.define
class _Job:
    """Everything a chunk of rows needs; forked workers inherit it instead of unpickling it."""

    rows: Sequence[dict[str, Any]]
    profile: Any
    tokenizer: Any
    tpl: ChatTemplate
    max_length: int
    seed: int
    truncation: bool
    source: str
    on_invalid: str = "error"
    #: The tokenizer's control tokens when ``special_tokens="reject"`` (else empty).
    controls: list[str] = attrs.Factory(list)
    #: Use the word cache when it applies (off only to compare with the tokenizer's path).
    word_cache: bool = True
    backend: Any = None
    #: In a worker: the backend's NFC normalizer, switched off for batches already in NFC.
    nfc: Any = None
    #: The word cache (``data.words``) when the backend is of its shape, else None.
    words: Any = None


@attrs.define
class _Part:
    """What one contiguous chunk of rows produced (merged in row order)."""

    ids: list[np.ndarray] = attrs.Factory(list)
    trained: list[np.ndarray] = attrs.Factory(list)
    lengths: list[int] = attrs.Factory(list)
    num_trained: list[int] = attrs.Factory(list)
    lines: list[int] = attrs.Factory(list)
    dropped: Counter = attrs.Factory(Counter)
    truncated: int = 0
    problems: list[str] = attrs.Factory(list)
    #: The chunk's first ``MAX_REPORTED`` control-token hits (``file:line: why``) and how many
    #: there were in all.
    smuggled: list[str] = attrs.Factory(list)
    smuggled_count: int = 0
    error: UserError | None = None

    def compact(self) -> _Part:
        """One array per column instead of one per row (cheaper to send between processes)."""
        if len(self.ids) != 1:
            self.ids = [np.concatenate(self.ids) if self.ids else np.zeros(0, np.int32)]
            self.trained = [np.concatenate(self.trained) if self.trained
                            else np.zeros(0, np.bool_)]
        return self


_current: _Job | None = None  # the job forked workers inherit


def _compute(job: _Job, workers: int) -> tuple[Tokenized, PreprocessStats]:
    global _current
    job.backend = _fast_backend(job.tokenizer)
    if job.backend is not None and job.word_cache:
        job.words = WordEncoder.for_backend(job.backend)
    n = len(job.rows)
    parts: list[_Part] | None = None
    if workers > 1 and n > 1:
        if isinstance(job.rows, Rows):
            job.rows.preload()  # read once here, shared by the forked workers
        size = -(-n // (workers * 4))  # a few chunks per worker evens out slow ones
        bounds = [(a, min(a + size, n)) for a in range(0, n, size)]
        _current = job
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
                parts = list(pool.map(_run_chunk, bounds))
        except (BrokenProcessPool, OSError):  # a worker died or could not start: do it here
            parts = None
        finally:
            _current = None
    if parts is None:
        parts = [_encode_chunk(job, 0, n)]
    return _merge(job, parts, n)


def _init_worker() -> None:
    # Each process tokenizes its own chunk: the tokenizer's internal threads would only
    # compete with the other workers (and warn about having been forked).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run_chunk(bounds: tuple[int, int]) -> _Part:
    job = _current
    assert job is not None
    # This process owns its copy of the tokenizer, so it may switch the normalizer off for
    # text it would not change: NFC of NFC text is the same text, with the same offsets, and
    # skipping it saves ~15% of tokenizing.
    normalizer = getattr(job.backend, "normalizer", None)
    if type(normalizer).__name__ == "NFC":
        job.nfc = normalizer
    return _encode_chunk(job, *bounds)


def _merge(job: _Job, parts: list[_Part], n_rows: int) -> tuple[Tokenized, PreprocessStats]:
    stats = PreprocessStats(rows_in=n_rows)
    for part in parts:  # chunks are in row order, so the first error is the first row's
        if part.error is not None:
            raise part.error
    dropped: Counter[str] = Counter()
    smuggled: list[str] = []
    smuggled_count = 0
    for part in parts:
        dropped.update(part.dropped)
        stats.truncated += part.truncated
        stats.problems.extend(part.problems)
        smuggled.extend(part.smuggled)
        smuggled_count += part.smuggled_count
    del stats.problems[MAX_REPORTED:]
    del smuggled[MAX_REPORTED:]
    if smuggled_count and job.on_invalid == "error":
        more = smuggled_count - len(smuggled)
        raise DataError("\n".join([
            f"{job.source}: {dropped['special_token']} row(s) contain the tokenizer's control "
            "tokens in message content, where they would act as real turn markers (remove "
            "them, set data.on_invalid: skip to drop these rows, or "
            "data.special_tokens_in_content: allow):",
            *smuggled, *([f"... and {more} more"] if more else [])]))
    room = MAX_REPORTED - len(stats.problems)
    stats.problems.extend(smuggled[: max(room, 0)])
    parts = [part.compact() for part in parts]
    lengths = list(chain.from_iterable(part.lengths for part in parts))
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    result = Tokenized(
        input_ids=np.concatenate([p.ids[0] for p in parts]).astype(np.int32, copy=False),
        trained=np.concatenate([p.trained[0] for p in parts]).astype(np.bool_, copy=False),
        offsets=offsets,
        num_trained=np.array(list(chain.from_iterable(p.num_trained for p in parts)), np.int64),
        line=np.array(list(chain.from_iterable(p.lines for p in parts)), np.int64),
    )
    stats.rows_kept = len(result)
    stats.dropped = dict(dropped)
    stats.total_tokens = int(offsets[-1])
    stats.trained_tokens = int(result.num_trained.sum())
    return result, stats


def _encode_chunk(job: _Job, start: int, stop: int) -> _Part:
    """Rows ``start:stop``: per row transform -> validate -> render, then per batch tokenize and
    label, then per row drop too-long / untrained ones (counted by reason)."""
    part = _Part()
    pending: list[tuple[int, int, list, str, list]] = []  # (index, line, messages, text, spans)
    try:
        for index in range(start, stop):
            rendered = _prepare_row(job, index, part)
            if rendered is not None:
                pending.append(rendered)
            if len(pending) >= BATCH_ROWS or (index == stop - 1 and pending):
                _encode_batch(job, pending, part)
                pending = []
    except UserError as exc:  # reported by the parent, in row order
        part.error = exc
    return part.compact()


def _prepare_row(job: _Job, index: int, part: _Part) -> tuple[int, int, list, str, list] | None:
    """Prepare (system prompt, transform), validate, check for control tokens and render row
    ``index``; ``None`` when the row is dropped (counted by reason)."""
    row = job.rows[index]
    line = int(row.get(LINE_KEY, 0) or 0)
    at = row_where(row, job.source, index)
    example, problems = prepare_row(job.profile, row, index, job.seed, at)
    if problems:
        part.dropped["profile_invalid"] += 1
        room = MAX_REPORTED - len(part.problems)
        part.problems.extend(f"{at}: {p}" for p in problems[: max(room, 0)])
        return None
    messages = example["messages"]
    found = _control_tokens(messages, job.controls) if job.controls else []
    if found:
        part.dropped["special_token"] += 1
        part.smuggled_count += len(found)
        room = MAX_REPORTED - len(part.smuggled)
        part.smuggled.extend(f"{at}: {f}" for f in found[: max(room, 0)])
        return None
    try:
        text, spans = render_with_spans(messages, job.tokenizer, job.tpl)
    except UserError as exc:
        raise UserError(f"{at}: {exc}") from exc
    return index, line, messages, text, spans


def _control_tokens(messages: list[dict[str, Any]], controls: list[str]) -> list[str]:
    """``messages[i].content: contains the control token '<|im_end|>'`` for each hit."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str):
            continue
        for token in controls:
            if token in content:
                out.append(f"messages[{i}].content: contains the control token {token!r}")
                break
    return out


def _encode_batch(job: _Job, pending: list[tuple[int, int, list, str, list]], part: _Part) -> None:
    """Tokenize and label ``pending`` rows, then keep or drop each (counted by reason)."""
    texts = [p[3] for p in pending]
    if job.backend is None:  # no fast tokenizer: the reference path, row by row
        for _index, line, messages, _text, _spans in pending:
            enc = encode(messages, job.tokenizer, job.tpl)
            _keep(job, part, line, messages, np.asarray(enc.input_ids, np.int32),
                  np.asarray(enc.labels) != IGNORE_INDEX)
        return
    ids, trained, lengths = _label_batch(job, texts, [p[4] for p in pending])
    pos = 0
    for (_index, line, messages, _text, _spans), n in zip(pending, lengths.tolist(), strict=True):
        _keep(job, part, line, messages, ids[pos : pos + n], trained[pos : pos + n])
        pos += n


def _keep(job: _Job, part: _Part, line: int, messages: list, ids: np.ndarray,
          trained: np.ndarray) -> None:
    if len(ids) > job.max_length:
        cut = truncate(encode(messages, job.tokenizer, job.tpl), job.max_length) \
            if job.truncation else None
        if cut is None:
            part.dropped["too_long"] += 1
            return
        ids = np.asarray(cut.input_ids, np.int32)
        trained = np.asarray(cut.labels) != IGNORE_INDEX
        part.truncated += 1
    num_trained = int(np.count_nonzero(trained))
    if num_trained == 0:
        part.dropped["no_trained_tokens"] += 1
        return
    part.ids.append(ids)
    part.trained.append(trained)
    part.lengths.append(len(ids))
    part.num_trained.append(num_trained)
    part.lines.append(line)


def _fast_backend(tokenizer: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer`` that encodes like ``tokenizer``, or ``None`` (then the
    per-row path); see :func:`trainer_core.data.tokenizer.rust_backend`."""
    from trainer_core.data.tokenizer import rust_backend

    return rust_backend(tokenizer)


def _tokenize(job: _Job, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, offsets, lengths)`` of ``texts`` as the tokenizer's ``encode_batch`` gives them,
    offsets moved to the concatenation of all texts: by the word cache for the texts it
    takes, by the tokenizer for the others."""
    if job.words is not None:
        ids, offs, lengths, done = job.words.encode(texts)
    else:
        ids, offs = np.zeros(0, np.int32), np.zeros((0, 2), np.int64)
        lengths, done = np.zeros(len(texts), np.int64), np.zeros(len(texts), np.bool_)
    rest = np.flatnonzero(~done).tolist()
    if rest:
        r_ids, r_offs, r_lengths = _encode_backend(job, [texts[i] for i in rest])
        if len(rest) == len(texts):
            ids, offs, lengths = r_ids, r_offs, r_lengths
        else:  # interleave both in text order
            starts = np.zeros(len(texts), np.int64)
            np.cumsum(lengths[:-1], out=starts[1:])
            r_starts = np.zeros(len(rest), np.int64)
            np.cumsum(r_lengths[:-1], out=r_starts[1:])
            lengths = lengths.copy()
            lengths[rest] = r_lengths
            slots = {i: k for k, i in enumerate(rest)}
            pick_ids, pick_offs = [], []
            for i in range(len(texts)):
                k = slots.get(i)
                if k is None:
                    a, b = starts[i], starts[i] + lengths[i]
                    pick_ids.append(ids[a:b])
                    pick_offs.append(offs[a:b])
                else:
                    a, b = r_starts[k], r_starts[k] + r_lengths[k]
                    pick_ids.append(r_ids[a:b])
                    pick_offs.append(r_offs[a:b])
            ids, offs = np.concatenate(pick_ids), np.concatenate(pick_offs)
    # Move every text to its place in the concatenation of all texts.
    text_base = np.zeros(len(texts), np.int64)
    np.cumsum([len(t) for t in texts[:-1]], out=text_base[1:])
    offs = offs + np.repeat(text_base, lengths)[:, None]
    return ids.astype(np.int32, copy=False), offs, lengths


def _encode_backend(job: _Job, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tokenizer's ``encode_batch``: ids, offsets inside each text, lengths."""
    if job.nfc is not None:
        in_nfc = all(unicodedata.is_normalized("NFC", t) for t in texts)
        job.backend.normalizer = None if in_nfc else job.nfc
    encodings = job.backend.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e) for e in encodings), np.int64, len(encodings))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int32, total)
    offs = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)),
                       np.int64, 2 * total).reshape(total, 2)
    return ids, offs, lengths


def _label_batch(job: _Job, texts: list[str], spans: list[list[tuple[int, int]]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize ``texts``; a token is trained iff its characters overlap one of its text's
    ``spans`` (``chat.label_offsets``' rule, on the batch's concatenated text)."""
    ids, offs, lengths = _tokenize(job, texts)
    text_base = np.zeros(len(texts), np.int64)
    np.cumsum([len(t) for t in texts[:-1]], out=text_base[1:])
    char_total = int(text_base[-1]) + len(texts[-1])
    flat = [(a, b) for base, row in zip(text_base.tolist(), spans, strict=True)
            for a, b in ((base + a, base + b) for a, b in row)]
    edges = np.zeros(char_total + 1, np.int32)
    if flat:
        bounds = np.array(flat, np.int64)
        np.add.at(edges, bounds[:, 0], 1)
        np.add.at(edges, bounds[:, 1], -1)
    inside = np.cumsum(edges[:-1]) > 0  # per character: inside a trained span
    before = np.zeros(char_total + 1, np.int64)  # trained characters before each position
    np.cumsum(inside, out=before[1:])
    start, end = offs[:, 0], offs[:, 1]
    trained = (end > start) & (before[end] > before[start])
    return ids, trained, lengths


def _load(entry: Path) -> tuple[Tokenized, PreprocessStats] | None:
    stats_file = entry / "stats.json"
    if not stats_file.is_file():
        return None
    try:
        stats = PreprocessStats(**json.loads(stats_file.read_text(encoding="utf-8")))
        result = Tokenized.load(entry, stats)
    except Exception:  # a damaged entry is rebuilt, never fatal
        shutil.rmtree(entry, ignore_errors=True)
        return None
    stats.cache_hit = True
    return result, stats


def _store(entry: Path, result: Tokenized, stats: PreprocessStats) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name[:16]}-", dir=entry.parent))
    try:
        result.save(tmp)
        (tmp / "stats.json").write_text(json.dumps(stats.to_dict()), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:  # another process stored the same entry first; theirs is as good
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
