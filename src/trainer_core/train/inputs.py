"""What a run trains on: the dataset file, validated rows, preprocessed examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer_core.config import TrainerConfig
from trainer_core.errors import UserError


def dataset_path(cfg: TrainerConfig) -> Path:
    if cfg.data.dataset is not None:
        return Path(cfg.data.dataset)
    from trainer_core.demo import sample_dataset_path

    return sample_dataset_path()


def load_rows(cfg: TrainerConfig) -> tuple[list, list, dict[str, int]]:
    """Validated training and validation rows, plus counts of skipped rows by reason."""
    from trainer_core.data.rows import check_rows, read_rows, split_rows

    path = dataset_path(cfg)
    if not path.is_file():
        raise UserError(f"data.dataset: {path}: file not found")
    rows, problems = read_rows(str(path))
    skipped = dict(check_rows(problems, cfg.data.on_invalid, str(path)))
    if cfg.data.validation is not None:
        vpath = Path(cfg.data.validation)
        if not vpath.is_file():
            raise UserError(f"data.validation: {vpath}: file not found")
        val_rows, vproblems = read_rows(str(vpath))
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
        workers=cfg.data.preprocess_workers,
    )
    return ds, stats.to_dict()


def prepare_examples(cfg: TrainerConfig, profile: Any, tokenizer: Any, train_rows: list,
                     val_rows: list) -> tuple[Any, Any, dict[str, dict[str, Any]]]:
    """Transform, template, label and tokenize (cached); returns train and validation examples
    (sequences of ``{"input_ids": [...], "labels": [...]}``) and the preprocessing stats of
    each."""
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
    return train_examples, val_examples, {"train": train_stats, "validation": val_stats}


def _examples(ds: Any) -> Any:
    """The training view of preprocessed examples: ``{"input_ids", "labels"}`` lists built
    when a step asks for them, not all up front (100k rows would take seconds and gigabytes)."""
    return ds.examples()
