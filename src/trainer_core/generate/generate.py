"""``trainer generate``: answer prompts with a model and its profile's logits processors.

If the model directory is a trainer output (it has ``run.json``), the profile and its options
come from there unless overridden, so generation happens in the format the model was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_core.errors import UserError


def run_manifest(model_dir: Path) -> dict[str, Any]:
    """The run.json of the run that produced ``model_dir`` (``{}`` for any other model)."""
    manifest = model_dir / "run.json"
    if not manifest.exists():
        return {}
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{manifest}: unreadable run manifest: {exc}") from None


def run_profile(model_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """Profile name and options recorded by the run that produced ``model_dir``."""
    profile = run_manifest(model_dir).get("profile") or {}
    return profile.get("name"), dict(profile.get("options") or {})


def run_generate(model_dir: str, profile_name: str | None, prompt: str | None,
                 dataset: str | None, count: int, max_new_tokens: int | None,
                 use_processors: bool, option_overrides: dict[str, Any]
                 ) -> list[dict[str, Any]]:
    """Generate for ``--prompt`` or the first ``count`` rows of ``--dataset``; returns records
    (prompt, output, reference, scores)."""
    from trainer_core.config import load_config

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise UserError(f"--model {model_dir}: not a model directory (no config.json)")
    recorded_name, recorded_options = run_profile(path)
    name = profile_name or recorded_name or "plain_sft"
    if name == recorded_name:
        from trainer_core.plugins.registry import missing_profile_hint

        hint = missing_profile_hint(name, run_manifest(path))
        if hint is not None:
            raise UserError(f"--model {model_dir}: {hint}")
    options = recorded_options if name == recorded_name else {}
    for key, value in option_overrides.items():
        if not key.startswith("profile.options."):
            raise UserError(f"--set {key}: only profile.options.* can be set here")
        options[key.removeprefix("profile.options.")] = value
    overrides: dict[str, Any] = {"profile.name": name, "profile.options": options,
                                 "model.path": str(path)}
    if max_new_tokens is not None:
        overrides["monitoring.max_new_tokens"] = max_new_tokens
    cfg = load_config(overrides=overrides)

    from trainer_core.generate.previews import preview_prompts
    from trainer_core.model.loading import load_model, pick_device
    from trainer_core.plugins.registry import build_profile

    profile = build_profile(cfg)
    if prompt is not None:
        rows = [{"messages": [{"role": "user", "content": prompt},
                              {"role": "assistant", "content": "(none)"}]}]
        references = [None]
    else:
        from trainer_core.data.rows import check_rows, read_rows

        assert dataset is not None  # the CLI requires exactly one of prompt / dataset
        rows, problems = read_rows(dataset)
        check_rows(problems, "error", dataset)
        rows = rows[:count]
        references = [None] * len(rows)
    prompts = preview_prompts(rows, profile, len(rows), cfg.data.seed)
    if prompt is not None:
        prompts[0]["reference"] = None
    else:
        references = [p["reference"] for p in prompts]

    from trainer_core.data.chat import render_generation_prompt
    from trainer_core.data.tokenizer import load_tokenizer
    from trainer_core.generate.processors import generate
    from trainer_core.plugins.registry import collect_logits_processors

    tokenizer = load_tokenizer(str(path), trust_remote_code=cfg.model.trust_remote_code)
    device = pick_device(cfg)
    model = load_model(path, cfg, device)
    model.eval()
    texts = [render_generation_prompt(p["messages"], cfg.model.chat_template, tokenizer)
             for p in prompts]
    processors = collect_logits_processors(profile, tokenizer, cfg) if use_processors else []
    outputs = generate(model, tokenizer, texts, processors, cfg.monitoring.max_new_tokens)
    records = []
    for p, ref, out in zip(prompts, references, outputs, strict=False):
        scores = profile.score(out, p["example"])
        if ref is None:  # a bare --prompt has no reference answer to compare with
            scores = {k: v for k, v in scores.items() if "reference" not in k}
        records.append({"prompt": p["messages"][-1]["content"], "output": out,
                        "reference": ref, "scores": scores})
    return records
