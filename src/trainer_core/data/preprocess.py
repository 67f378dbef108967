"""Validated rows -> tokenized training features (a Hugging Face ``datasets.Dataset``), cached.

Per row ``i``: the profile prepares it (its system prompt applied, then ``transform`` with
``random.Random(derive_seed(seed, i))``), ``validate`` checks the result, and rows with problems
follow ``data.on_invalid`` (``error``: stop, listing them; ``skip``: drop and count them as
``profile_invalid``); then the conversation is rendered and labelled
(``trainer_core.chat.encode``). Rows longer than ``max_length`` are dropped (or, when the user
opted in, truncated after their last complete assistant turn); rows with no trained token are
dropped. Every drop is counted by reason in the stats.

The result is cached on disk under ``<cache_dir>/<key>/`` where ``key`` is a sha256 of every
input that changes it (rows, profile name/version/options/date, tokenizer, template text,
max_length, truncation, seed, ``PREPROCESS_VERSION``). Entries are written to a temporary
folder and renamed into place, so a crash or a concurrent run never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from trainer_core.data.chat import ChatTemplate, encode, resolve_template, truncate
from trainer_core.data.rows import LINE_KEY, ON_INVALID, example_of, example_problems
from trainer_core.errors import DataError, UserError

#: Bump whenever this module's output changes for the same inputs (invalidates all caches).
PREPROCESS_VERSION = "2"  # 2: the core applies Profile.system_prompt
COLUMNS = ("input_ids", "labels", "length", "num_trained", "line")
MAX_REPORTED = 20


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
    found in the transformed row, or a malformed transform result), ``too_long``, ``no_trained_tokens``. ``truncated`` counts kept
    rows that were cut. ``problems`` holds the first profile problems as ``file:line: why``.
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
    root = os.environ.get("TRAINER_CACHE") or os.path.join("~", ".cache", "trainer")
    return Path(root).expanduser() / "preprocess"


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
    for row in rows:  # line numbers included: they are stored in the "line" column
        digest.update(b"\n")
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=repr).encode())
    return digest.hexdigest()


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
) -> tuple[Any, PreprocessStats]:
    """Transform, validate, encode and filter ``rows`` (from ``data.read_rows``); cached.

    Returns ``(dataset, stats)``; the dataset has columns ``input_ids``, ``labels``, ``length``,
    ``num_trained`` and ``line`` (source line, 0 when unknown), in row order. ``cache_dir``
    defaults to ``default_cache_dir()``; ``source`` names the data in problem messages.
    ``stats.cache_hit`` tells whether the result came from the cache (no transform ran).
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
    columns, stats = _compute(rows, profile, tokenizer, tpl, max_length, seed, truncation, source,
                              special_tokens, on_invalid)
    stats.cache_key = key
    dataset = _to_dataset(columns)
    if use_cache:  # stored either way: the policy is applied to the stats, cached or not
        try:
            _store(entry, dataset, stats)
        except OSError as exc:  # a read-only or full cache disk must not stop training
            warnings.warn(f"preprocessing cache not written to {entry}: {exc}", stacklevel=2)
    _check_rejected(stats, on_invalid, profile, source)
    return dataset, stats


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


def _compute(
    rows: Sequence[dict[str, Any]],
    profile: Any,
    tokenizer: Any,
    tpl: ChatTemplate,
    max_length: int,
    seed: int,
    truncation: bool,
    source: str,
    special_tokens: str = "reject",
    on_invalid: str = "error",
) -> tuple[dict[str, list], PreprocessStats]:
    from trainer_core.data.tokenizer import special_token_texts

    controls = special_token_texts(tokenizer) if special_tokens == "reject" else []
    smuggled: list[str] = []
    stats = PreprocessStats(rows_in=len(rows))
    dropped: Counter[str] = Counter()
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    for index, row in enumerate(rows):
        line = int(row.get(LINE_KEY, 0) or 0)
        where = f"{source}:{line}" if line else f"{source}: row {index + 1}"
        example, problems = prepare_row(profile, row, index, seed, where)
        if problems:
            dropped["profile_invalid"] += 1
            room = MAX_REPORTED - len(stats.problems)
            stats.problems.extend(f"{where}: {p}" for p in problems[: max(room, 0)])
            continue
        found = _control_tokens(example["messages"], controls) if controls else []
        if found:
            dropped["special_token"] += 1
            smuggled.extend(f"{where}: {f}" for f in found)
            continue
        try:
            encoded = encode(example["messages"], tokenizer, tpl)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from exc
        if encoded.length > max_length:
            cut = truncate(encoded, max_length) if truncation else None
            if cut is None:
                dropped["too_long"] += 1
                continue
            encoded = cut
            stats.truncated += 1
        trained = encoded.num_trained
        if trained == 0:
            dropped["no_trained_tokens"] += 1
            continue
        columns["input_ids"].append(encoded.input_ids)
        columns["labels"].append(encoded.labels)
        columns["length"].append(encoded.length)
        columns["num_trained"].append(trained)
        columns["line"].append(line)
        stats.total_tokens += encoded.length
        stats.trained_tokens += trained
    if smuggled and on_invalid == "error":
        shown = smuggled[:MAX_REPORTED]
        more = len(smuggled) - len(shown)
        raise DataError("\n".join([
            f"{source}: {dropped['special_token']} row(s) contain the tokenizer's control tokens "
            "in message content, where they would act as real turn markers (remove them, set "
            "data.on_invalid: skip to drop these rows, or data.special_tokens_in_content: allow):",
            *shown, *([f"... and {more} more"] if more else [])]))
    stats.rows_kept = len(columns["input_ids"])
    stats.dropped = dict(dropped)
    room = MAX_REPORTED - len(stats.problems)
    stats.problems.extend(smuggled[: max(room, 0)])
    return columns, stats


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


def _to_dataset(columns: dict[str, list]) -> Any:
    import datasets

    ints = datasets.List(datasets.Value("int64"))
    features = datasets.Features(
        {
            "input_ids": ints,
            "labels": ints,
            "length": datasets.Value("int64"),
            "num_trained": datasets.Value("int64"),
            "line": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


def _load(entry: Path) -> tuple[Any, PreprocessStats] | None:
    stats_file = entry / "stats.json"
    if not stats_file.is_file():
        return None
    import datasets

    try:
        stats = PreprocessStats(**json.loads(stats_file.read_text(encoding="utf-8")))
        dataset = datasets.load_from_disk(str(entry / "dataset"))
    except Exception:  # a damaged entry is rebuilt, never fatal
        shutil.rmtree(entry, ignore_errors=True)
        return None
    stats.cache_hit = True
    return dataset, stats


def _store(entry: Path, dataset: Any, stats: PreprocessStats) -> None:
    import datasets

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name[:16]}-", dir=entry.parent))
    quiet = datasets.is_progress_bar_enabled()
    try:
        if quiet:  # "Saving the dataset" bars would clutter the CLI output
            datasets.disable_progress_bars()
        try:
            dataset.save_to_disk(str(tmp / "dataset"))
        finally:
            if quiet:
                datasets.enable_progress_bars()
        (tmp / "stats.json").write_text(json.dumps(stats.to_dict()), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:  # another process stored the same entry first; theirs is as good
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
