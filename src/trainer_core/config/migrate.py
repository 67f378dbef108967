"""``trainer config migrate``: convert the old flat config format into the current one.

The old files mixed flat top-level keys (``model_path``, ``learning_rate``, ``fp16``...) with
partly nested ``hyperparams``/``locked``/``profile`` sections and service keys of the old daemon
(polling, snapshots, retention, data generation). We map what has a home in the new config (the
daemon's keys go to the ``daemon`` section) and
return everything else as ``unmapped`` so the caller can list it; nothing is dropped silently.
"""

from __future__ import annotations

from typing import Any

import attrs

from trainer_core.config import CONFIG_VERSION, from_dict, set_dotted, to_dict

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
