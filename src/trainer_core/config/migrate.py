"""``trainer config migrate``: convert the old flat config format, or an Axolotl or LLaMA-Factory
SFT YAML (``--from axolotl|llamafactory``, at the end of this module), into the current one.

The old files mixed flat top-level keys (``model_path``, ``learning_rate``, ``fp16``...) with
partly nested ``hyperparams``/``locked``/``profile`` sections and service keys of the old daemon
(polling, snapshots, retention, data generation). We map what has a home in the new config (the
daemon's keys go to the ``daemon`` section) and
return everything else as ``unmapped`` so the caller can list it; nothing is dropped silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from trainer_core.config import CONFIG_VERSION, from_dict, set_dotted, to_dict
from trainer_core.errors import ConfigError
from trainer_core.files import missing_model_hint

#: Old flat key -> new dotted path.
FLAT_KEYS = {
    "model_path": "model.path",
    "tokenizer_path": "model.tokenizer",
    "base_model": "locked.base_model",
    "batch_size": "hyperparams.batch_size",
    "gradient_accumulation": "hyperparams.gradient_accumulation",
    "learning_rate": "hyperparams.learning_rate",
    "warmup_steps": "hyperparams.warmup_steps",
    "max_length": "hyperparams.max_length",
    "eval_steps": "hyperparams.eval_steps",
    "save_steps": "hyperparams.save_steps",
    "num_epochs": "hyperparams.num_epochs",
    "seed": "hyperparams.seed",
    "num_eval_samples": "monitoring.num_preview_samples",
    "eval_max_tokens": "monitoring.max_new_tokens",
    # The old trainer wrote its working model into current_model_dir.
    "current_model_dir": "output.output_dir",
    "output_dir": "output.output_dir",
    # The old daemon's service keys.
    "poll_interval": "daemon.poll_interval_s",
    "snapshot_time": "daemon.snapshot_time",
}

#: Old keys inside the old daemon's ``retention`` object -> new dotted path. The old
#: ``max_age_hours`` aged out its snapshots; the new daemon's snapshots age out the same way.
RETENTION_KEYS = {
    "max_age_hours": "daemon.snapshot_max_age_h",
    "max_total_gb": "daemon.max_total_gb",
}

#: Old keys inside the old ``hyperparams`` section -> new dotted path.
HYPERPARAM_KEYS = {
    "fp_precision": "hyperparams.precision",
    "use_gradient_checkpointing": "hyperparams.gradient_checkpointing",
}


@attrs.define
class Migration:
    """The new config dict, the keys that could not be mapped, and notes on what was decided."""

    config: dict[str, Any]
    unmapped: dict[str, Any]
    notes: list[str]


def migrate(old: dict[str, Any]) -> Migration:
    flat: dict[str, tuple[Any, str]] = {}  # dotted -> (value, old key)
    unmapped: dict[str, Any] = {}
    notes: list[str] = []

    def put(dotted: str, value: Any, origin: str) -> None:
        if dotted in flat and flat[dotted][0] != value:
            kept_value, kept_origin = flat[dotted]
            if "." in kept_origin and "." not in origin:
                # A flat key met after its nested twin: the nested section still wins.
                notes.append(f"{kept_origin}={kept_value!r} overrides {origin}={value!r} "
                             f"for {dotted} (the nested section wins)")
                return
            why = "the nested section wins" if "." in origin else "the later key wins"
            notes.append(f"{origin}={value!r} overrides {kept_origin}={kept_value!r} "
                         f"for {dotted} ({why})")
        flat[dotted] = (value, origin)

    precision_flags = {k: old[k] for k in ("bf16", "fp16") if k in old}
    if precision_flags.get("bf16") and precision_flags.get("fp16"):
        notes.append("both bf16 and fp16 were true; kept bf16")
    if precision_flags.get("bf16"):
        put("hyperparams.precision", "bf16", "bf16")
    elif precision_flags.get("fp16"):
        put("hyperparams.precision", "fp16", "fp16")

    for key, value in old.items():
        if key in ("bf16", "fp16"):
            continue
        if key in FLAT_KEYS:
            put(FLAT_KEYS[key], value, key)
        elif key == "profile":
            if isinstance(value, str):
                put("profile.name", value, key)
            elif isinstance(value, dict):
                for k, v in value.items():
                    if k in ("name", "options"):
                        put(f"profile.{k}", v, f"profile.{k}")
                    else:
                        unmapped[f"profile.{k}"] = v
            else:
                unmapped[key] = value
        elif key in ("hyperparams", "locked") and isinstance(value, dict):
            for k, v in value.items():
                dotted = HYPERPARAM_KEYS.get(k, f"{key}.{k}") if key == "hyperparams" else f"locked.{k}"
                try:
                    set_dotted({}, dotted, v)  # is it a known field?
                except Exception:
                    unmapped[f"{key}.{k}"] = v
                    continue
                put(dotted, v, f"{key}.{k}")
        elif key == "retention" and isinstance(value, dict):
            for k, v in value.items():
                if k in RETENTION_KEYS:
                    put(RETENTION_KEYS[k], v, f"retention.{k}")
                else:
                    unmapped[f"retention.{k}"] = v
        elif key == "config_version":
            continue
        else:
            unmapped[key] = value

    tree: dict[str, Any] = {"config_version": CONFIG_VERSION}
    for dotted, (value, _) in flat.items():
        set_dotted(tree, dotted, value)
    # Validate now so a migrated file is known to load; return it in the full canonical form.
    return Migration(to_dict(from_dict(tree)), unmapped, notes)


# --------------------------------------------------------------------------- other frameworks
#
# The most common keys of an SFT config of Axolotl or LLaMA-Factory. A value the schema does not
# accept (a scheduler trainer has not) is listed with the unmapped keys, with a note saying why.

#: Axolotl key -> dotted path (the value is taken as it is).
AXOLOTL_KEYS = {
    "base_model": "model.path",
    "tokenizer_config": "model.tokenizer",
    "trust_remote_code": "model.trust_remote_code",
    "sequence_len": "hyperparams.max_length",
    "micro_batch_size": "hyperparams.batch_size",
    "gradient_accumulation_steps": "hyperparams.gradient_accumulation",
    "num_epochs": "hyperparams.num_epochs",
    "max_steps": "hyperparams.max_steps",
    "learning_rate": "hyperparams.learning_rate",
    "lr_scheduler": "hyperparams.lr_scheduler",
    "warmup_steps": "hyperparams.warmup_steps",
    "warmup_ratio": "hyperparams.warmup_ratio",
    "weight_decay": "hyperparams.weight_decay",
    "max_grad_norm": "hyperparams.max_grad_norm",
    "seed": "hyperparams.seed",
    "gradient_checkpointing": "hyperparams.gradient_checkpointing",
    "save_steps": "hyperparams.save_steps",
    "eval_steps": "hyperparams.eval_steps",
    "save_total_limit": "hyperparams.save_total_limit",
    "logging_steps": "environment.logging_steps",
    "output_dir": "output.output_dir",
    "sample_packing": "data.packing",
    "val_set_size": "data.validation_split",
}

#: LLaMA-Factory key -> dotted path.
LLAMAFACTORY_KEYS = {
    "model_name_or_path": "model.path",
    "trust_remote_code": "model.trust_remote_code",
    "cutoff_len": "hyperparams.max_length",
    "per_device_train_batch_size": "hyperparams.batch_size",
    "gradient_accumulation_steps": "hyperparams.gradient_accumulation",
    "num_train_epochs": "hyperparams.num_epochs",
    "max_steps": "hyperparams.max_steps",
    "learning_rate": "hyperparams.learning_rate",
    "lr_scheduler_type": "hyperparams.lr_scheduler",
    "warmup_steps": "hyperparams.warmup_steps",
    "warmup_ratio": "hyperparams.warmup_ratio",
    "weight_decay": "hyperparams.weight_decay",
    "max_grad_norm": "hyperparams.max_grad_norm",
    "seed": "hyperparams.seed",
    "save_steps": "hyperparams.save_steps",
    "eval_steps": "hyperparams.eval_steps",
    "save_total_limit": "hyperparams.save_total_limit",
    "logging_steps": "environment.logging_steps",
    "output_dir": "output.output_dir",
    "packing": "data.packing",
    "val_size": "data.validation_split",
    "preprocessing_num_workers": "data.preprocess_workers",
}

#: Keys that say what trainer does anyway: taken without a trace.
_AXOLOTL_IMPLIED = {"train_on_inputs": False, "strict": False}
_LLAMAFACTORY_IMPLIED = {"stage": "sft", "do_train": True, "finetuning_type": "full"}
#: Axolotl's chat_template -> model.chat_template.
_TEMPLATES = {"chatml": "chatml", "tokenizer_default": "tokenizer"}
#: LLaMA-Factory's dataset_info column names -> data.columns keys.
_LF_COLUMNS = {"prompt": "prompt", "query": "input", "response": "completion",
               "system": "system", "messages": "messages"}
_LF_ROLE_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}


class _Builder:
    """Collects mapped values (each checked against the schema alone), unmapped keys, notes."""

    def __init__(self) -> None:
        self.tree: dict[str, Any] = {"config_version": CONFIG_VERSION}
        self.unmapped: dict[str, Any] = {}
        self.notes: list[str] = []

    def put(self, dotted: str, value: Any, origin: str) -> bool:
        trial: dict[str, Any] = {}
        set_dotted(trial, dotted, value)
        try:
            from_dict(trial)
        except ConfigError as exc:
            self.unmapped[origin] = value
            self.notes.append(f"{origin}={value!r} not taken for {dotted}: {exc}")
            return False
        set_dotted(self.tree, dotted, value)
        return True

    def precision(self, old: dict[str, Any]) -> None:
        for key in ("bf16", "fp16"):
            if old.get(key) in (True, "auto") and "precision" not in self.tree.get(
                    "hyperparams", {}):
                self.put("hyperparams.precision", key, key)
            elif old.get(key) not in (None, False, True, "auto"):
                self.unmapped[key] = old[key]

    def done(self) -> Migration:
        path = self.tree.get("model", {}).get("path")
        if isinstance(path, str) and not Path(path).expanduser().exists():
            self.notes.append(f"model.path {path!r} is not a local directory: "
                              + missing_model_hint(path))
        return Migration(to_dict(from_dict(self.tree)), self.unmapped, self.notes)


def migrate_axolotl(old: dict[str, Any], source: Path | None = None) -> Migration:
    """An Axolotl SFT YAML's common keys; the first of ``datasets`` becomes ``data``."""
    b = _Builder()
    b.precision(old)
    for key, value in old.items():
        if key in ("bf16", "fp16"):
            continue
        if key in AXOLOTL_KEYS:
            b.put(AXOLOTL_KEYS[key], value, key)
        elif key in _AXOLOTL_IMPLIED and value == _AXOLOTL_IMPLIED[key]:
            continue
        elif key == "chat_template" and value in _TEMPLATES:
            b.put("model.chat_template", _TEMPLATES[value], key)
        elif key in ("datasets", "test_datasets") and isinstance(value, list) and value:
            field = "data.dataset" if key == "datasets" else "data.validation"
            _axolotl_dataset(b, key, value, field)
        else:
            b.unmapped[key] = value
    return b.done()


def _axolotl_dataset(b: _Builder, key: str, datasets: list[Any], field: str) -> None:
    first, rest = datasets[0], datasets[1:]
    if rest:
        b.unmapped[f"{key}[1:]"] = rest
        b.notes.append(f"{key}: only the first dataset is taken (trainer reads one file)")
    if not isinstance(first, dict) or "path" not in first:
        b.unmapped[f"{key}[0]"] = first
        return
    entry = dict(first)
    b.put(field, entry.pop("path"), f"{key}[0].path")
    if field != "data.dataset":  # the format options come from the training data
        b.unmapped.update({f"{key}[0].{k}": v for k, v in entry.items()})
        return
    kind = entry.pop("type", None)
    fmt = {"chat_template": "messages", "sharegpt": "sharegpt", "alpaca": "alpaca"}.get(
        kind if isinstance(kind, str) else "")
    if fmt is None:
        if kind is not None:
            b.unmapped[f"{key}[0].type"] = kind
        b.unmapped.update({f"{key}[0].{k}": v for k, v in entry.items()})
        return
    columns: dict[str, str] = {}
    roles: dict[str, str] = {}
    field_messages = entry.pop("field_messages", None)
    if isinstance(field_messages, str):
        columns["messages"] = field_messages
    mappings = entry.pop("message_property_mappings", None) or {}
    for ours, theirs in (("role", entry.pop("message_field_role", None)),
                         ("content", entry.pop("message_field_content", None))):
        theirs = mappings.get(ours, theirs) if isinstance(mappings, dict) else theirs
        if isinstance(theirs, str):
            columns[ours] = theirs
    for ours, values in (entry.pop("roles", None) or {}).items():
        for value in values if isinstance(values, list) else [values]:
            if ours in ("system", "user", "assistant") and isinstance(value, str):
                roles[value] = ours
    if fmt == "messages" and columns.get("messages") == "conversations" and \
            columns.get("role") == "from":
        fmt = "sharegpt"  # the usual ShareGPT file read through Axolotl's chat_template
    defaults = {"messages": {"messages": "messages", "role": "role", "content": "content"},
                "sharegpt": {"messages": "conversations", "role": "from", "content": "value"},
                "alpaca": {}}[fmt]
    columns = {k: v for k, v in columns.items() if defaults.get(k) != v}
    b.put("data.format", fmt, f"{key}[0].type")
    if columns:
        b.put("data.columns", columns, f"{key}[0] columns")
    if roles:
        b.put("data.roles", roles, f"{key}[0].roles")
    b.unmapped.update({f"{key}[0].{k}": v for k, v in entry.items()})


def migrate_llamafactory(old: dict[str, Any], source: Path | None = None) -> Migration:
    """A LLaMA-Factory SFT YAML's common keys. ``dataset`` names an entry of
    ``<dataset_dir>/dataset_info.json`` (looked for from the current directory, then from the
    YAML's folder): its file, formatting, columns and tags become ``data``."""
    b = _Builder()
    b.precision(old)
    for key, value in old.items():
        if key in ("bf16", "fp16", "dataset_dir"):
            continue
        if key in LLAMAFACTORY_KEYS:
            b.put(LLAMAFACTORY_KEYS[key], value, key)
        elif key in _LLAMAFACTORY_IMPLIED and value == _LLAMAFACTORY_IMPLIED[key]:
            continue
        elif key in ("dataset", "eval_dataset") and isinstance(value, str):
            _llamafactory_dataset(b, key, value, old.get("dataset_dir", "data"), source)
        else:
            b.unmapped[key] = value
    return b.done()


def _llamafactory_dataset(b: _Builder, key: str, names: str, dataset_dir: Any,
                          source: Path | None) -> None:
    import json

    name, *rest = [n.strip() for n in names.split(",") if n.strip()]
    if rest:
        b.unmapped[key] = names
        b.notes.append(f"{key}: several datasets ({names}); trainer reads one file: set "
                       "data.dataset yourself")
        return
    bases = [Path(str(dataset_dir))]
    if source is not None and not bases[0].is_absolute():
        bases.append(source.parent / str(dataset_dir))
    for base in bases:
        info_file = base / "dataset_info.json"
        if info_file.is_file():
            break
    else:
        b.unmapped[key] = names
        b.notes.append(f"{key}: {name!r} is described in {bases[0] / 'dataset_info.json'}, "
                       "which was not found: set data.dataset (and data.format) yourself")
        return
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))[name]
        file_name = info["file_name"]
    except (OSError, ValueError, KeyError, TypeError):
        b.unmapped[key] = names
        b.notes.append(f"{key}: {name!r} has no local file_name in {info_file} (a hub "
                       "dataset?): set data.dataset yourself")
        return
    field = "data.dataset" if key == "dataset" else "data.validation"
    b.put(field, str(base / file_name), key)
    if key != "dataset":
        return
    fmt = info.get("formatting", "alpaca")
    if fmt not in ("alpaca", "sharegpt"):
        b.unmapped[f"{key}.formatting"] = fmt
        return
    defaults = {"alpaca": {"prompt": "instruction", "input": "input", "completion": "output",
                           "system": "system"},
                "sharegpt": {"messages": "conversations", "role": "from", "content": "value",
                             "system": "system"}}[fmt]
    columns: dict[str, str] = {}
    for theirs, column in (info.get("columns") or {}).items():
        if theirs in _LF_COLUMNS and _LF_COLUMNS[theirs] in defaults:
            columns[_LF_COLUMNS[theirs]] = column
        else:
            b.unmapped[f"{key}.columns.{theirs}"] = column
    roles: dict[str, str] = {}
    for tag, value in (info.get("tags") or {}).items():
        if tag in ("role_tag", "content_tag"):
            columns[tag.removesuffix("_tag")] = value
        elif tag in _LF_ROLE_TAGS:
            roles[value] = _LF_ROLE_TAGS[tag]
        else:
            b.unmapped[f"{key}.tags.{tag}"] = value
    columns = {k: v for k, v in columns.items() if defaults.get(k) != v}
    b.put("data.format", fmt, f"{key}.formatting")
    if columns:
        b.put("data.columns", columns, f"{key}.columns")
    if roles:
        b.put("data.roles", roles, f"{key}.tags")


#: ``trainer config migrate --from``: the name -> the migration (old dict, its file).
MIGRATIONS = {
    "old": lambda old, _source=None: migrate(old),
    "axolotl": migrate_axolotl,
    "llamafactory": migrate_llamafactory,
}
