"""What a run trains on: the dataset file, validated rows, preprocessed examples, a step's
token budget, batches moved to the device, and the thread that collates the next step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

from trainer_core.config import TrainerConfig
from trainer_core.errors import UserError

T = TypeVar("T")


def dataset_path(cfg: TrainerConfig) -> Path:
    if cfg.data.dataset is not None:
        return Path(cfg.data.dataset)
    from trainer_core.demo import sample_dataset_path

    return sample_dataset_path()


#: (size, mtime_ns) of each data file when this process read its rows, by resolved path.
_READ_AS: dict[str, tuple[int, int]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def data_sha256(path: Path) -> str:
    """sha256 of a data file the run read, refusing one that changed since it was read (a
    file still being written): run.json and the checkpoints must name the rows trained."""
    from trainer_core.files import sha256_file

    key = str(Path(path).resolve())
    before = _READ_AS.get(key)
    digest = sha256_file(path)
    now = _stamp(path)
    if before is not None and now != before:
        raise UserError(f"{path}: the file changed while the run read it ({before[0]} -> "
                        f"{now[0]} bytes); write data under another name and rename it when "
                        "complete, then run again")
    return digest


def load_rows(cfg: TrainerConfig) -> tuple[Any, Any, dict[str, int]]:
    """Validated training and validation rows, plus counts of skipped rows by reason.

    The rows are sequences (:class:`~trainer_core.data.rows.Rows`, or an empty list for no
    validation rows): a file read before (same bytes) is not parsed again, and
    preprocessing keys its cache on the rows' digest."""
    from trainer_core.data.preprocess import default_cache_dir
    from trainer_core.data.rows import (
        RowFormat,
        check_data_file,
        check_rows,
        read_rows_cached,
        split_rows,
    )

    cache = cfg.data.cache_dir if cfg.data.cache_dir is not None else default_cache_dir()
    path = dataset_path(cfg)
    fmt = RowFormat.from_config(cfg.data)
    check_data_file(path, "data.dataset")
    stamp = _stamp(path)
    rows, problems = read_rows_cached(str(path), cache, fmt)
    if _stamp(path) != stamp:
        raise UserError(f"{path}: the file changed while it was read; write data under another "
                        "name and rename it when complete, then run again")
    _READ_AS[str(path.resolve())] = stamp
    train_rows: Sequence[dict[str, Any]]
    val_rows: Sequence[dict[str, Any]]
    skipped = dict(check_rows(problems, cfg.data.on_invalid, str(path)))
    if cfg.data.validation is not None:
        vpath = Path(cfg.data.validation)
        check_data_file(vpath, "data.validation")
        _READ_AS[str(vpath.resolve())] = _stamp(vpath)
        val_rows, vproblems = read_rows_cached(str(vpath), cache, fmt)
        for reason, n in check_rows(vproblems, cfg.data.on_invalid, str(vpath)).items():
            skipped[f"validation:{reason}"] = n
        train_rows = rows
    elif cfg.data.validation_split > 0 and len(rows) > 1:
        train_rows, val_rows = split_rows(rows, cfg.data.validation_split, cfg.data.seed)
    else:
        train_rows, val_rows = rows, []
    if not train_rows:
        raise UserError(f"{path}: no usable training rows")
    return train_rows, val_rows, skipped


def preprocess_rows(rows: list, cfg: TrainerConfig, profile: Any, tokenizer: Any,
                    source: str, seed_offset: int = 0) -> tuple[Any, dict[str, Any]]:
    from trainer_core.data.preprocess import preprocess

    ds, stats = preprocess(
        rows, profile, tokenizer, cfg.model.chat_template, cfg.hyperparams.max_length,
        cfg.data.seed + seed_offset, cfg.data.truncation, cfg.data.cache_dir, source=source,
        special_tokens=cfg.data.special_tokens_in_content, on_invalid=cfg.data.on_invalid,
        workers=cfg.data.preprocess_workers,
    )
    return ds, stats.to_dict()


def prepare_examples(cfg: TrainerConfig, profile: Any, tokenizer: Any, train_rows: list,
                     val_rows: list, skipped: dict[str, int] | None = None
                     ) -> tuple[Any, Any, dict[str, dict[str, Any]]]:
    """Transform, template, label and tokenize (cached); returns train and validation examples
    (sequences of ``{"input_ids": [...], "labels": [...]}``) and the preprocessing stats of
    each.

    ``skipped`` (rows dropped while reading, by reason) counts towards
    ``data.max_invalid_fraction`` together with the rows preprocessing dropped.
    """
    train_ds, train_stats = preprocess_rows(train_rows, cfg, profile, tokenizer,
                                            str(dataset_path(cfg)))
    val_ds, val_stats = (preprocess_rows(val_rows, cfg, profile, tokenizer,
                                         str(cfg.data.validation or dataset_path(cfg)),
                                         seed_offset=1)
                         if val_rows else (None, {}))
    train_examples = _examples(train_ds)
    val_examples = _examples(val_ds) if val_ds is not None else []
    if not train_examples:
        raise UserError("no training examples left after preprocessing; see the drop counts: "
                        f"{train_stats}")
    check_drop_fraction(cfg, skipped or {}, train_stats, val_stats)
    per_step = cfg.hyperparams.batch_size * cfg.hyperparams.gradient_accumulation
    if per_step > len(train_examples):
        # Refused before the plan lists a step's examples (a 10**9 batch would allocate them).
        raise UserError(f"hyperparams.batch_size x gradient_accumulation = {per_step} examples "
                        f"per step, but there are only {len(train_examples)} training examples; "
                        "lower them")
    return train_examples, val_examples, {"train": train_stats, "validation": val_stats}


def check_drop_fraction(cfg: TrainerConfig, skipped: dict[str, int], *stats: dict[str, Any]
                        ) -> None:
    """Refuse to train when more than ``data.max_invalid_fraction`` of all rows was dropped
    (a profile returning malformed rows, a wrong max_length...): such a run would "succeed" on
    a fraction of the data without anyone noticing."""
    reasons: dict[str, int] = dict(skipped)
    total = sum(skipped.values())
    for st in stats:
        if not st:
            continue
        total += st.get("rows_in", 0)
        for reason, n in st.get("dropped", {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
    dropped = sum(reasons.values())
    limit = cfg.data.max_invalid_fraction
    if total and dropped / total > limit:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        first = next((p for st in stats if st for p in st.get("problems", [])), None)
        raise UserError(f"{dropped} of {total} rows were dropped ({detail}), more than "
                        f"data.max_invalid_fraction={limit}"
                        + (f"; first problem: {first}" if first else "")
                        + "; fix the data or profile, or raise data.max_invalid_fraction")


def _examples(ds: Any) -> Any:
    """The training view of preprocessed examples: ``{"input_ids", "labels"}`` lists built
    when a step asks for them, not all up front (100k rows would take seconds and gigabytes)."""
    return ds.examples()


class Prefetcher(Generic[T]):
    """A step's inputs, built in a background thread while the step before trains.

    ``make(step)`` must be a pure function of ``step`` (the run's data order is: see
    :mod:`trainer_core.data.batching`). :meth:`prepare` starts building a step in the thread;
    :meth:`get` returns ``make(step)``, from the thread if that step was prepared, else built
    on the spot. ``trainer run`` prepares step ``k + 1`` once step ``k``'s device work is
    queued (``train_step``'s ``launched``), so the collation (~2 ms of Python at 8 examples
    per step) runs while the host waits for the GPU, and does not hold the interpreter while
    the host is launching work. An error in ``make`` is raised by the :meth:`get` of its step.
    ``ahead=False`` never uses the thread. Use it as a context manager: leaving stops the
    thread.
    """

    def __init__(self, make: Callable[[int], T], stop: int, ahead: bool = True) -> None:
        self.make = make
        self.stop = stop
        self.ahead = ahead
        self._pool: ThreadPoolExecutor | None = None
        self._next: tuple[int, Future[T]] | None = None

    def prepare(self, step: int) -> None:
        """Start building ``step`` in the thread (nothing at or past ``stop``)."""
        if not self.ahead or step >= self.stop:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._next = (step, self._pool.submit(self.make, step))

    def get(self, step: int) -> T:
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == step:
            return ahead[1].result()
        return self.make(step)

    def close(self) -> None:
        """Drop the step built in advance (its error too) and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._next = None

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def token_budget(cfg: TrainerConfig) -> int:
    """Tokens per micro-batch: ``data.max_tokens_per_batch``, else batch size x max length."""
    hp = cfg.hyperparams
    return cfg.data.max_tokens_per_batch or hp.batch_size * hp.max_length


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """A collated batch's tensors on ``device`` (copied without waiting, from pinned memory)."""
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v)
            for k, v in batch.items()}
