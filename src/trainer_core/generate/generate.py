"""``trainer generate``: answer prompts with a model and its profile's logits processors.

When the model directory is a trainer run (it has ``trainer_config.json``) or one of its
checkpoints (``<run>/checkpoints/step-N``), the run's own configuration is used: its profile
and options, its chat template and its settings, so prompts are rendered exactly as in
training. Flags override single pieces (``--profile``, ``--chat-template``, ``--set``).

Rows are answered in batches of ``batch_size`` and yielded as each batch finishes, so a large
``--dataset`` streams with bounded memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from trainer_core.errors import UserError
from trainer_core.files import CONFIG_FILE, RUN_MANIFEST

#: Default rows per generation batch: large enough to use a batch, small enough that padding
#: and the KV cache stay modest on a CPU.
DEFAULT_BATCH_SIZE = 8
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def run_directory(model_dir: Path) -> Path | None:
    """The trainer run that produced ``model_dir``: itself, or the run of a checkpoint."""
    if (model_dir / CONFIG_FILE).is_file():
        return model_dir
    if model_dir.parent.name == "checkpoints" and (model_dir.parent.parent / CONFIG_FILE
                                                   ).is_file():
        return model_dir.parent.parent
    return None


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_MARKERS)


def run_manifest(model_dir: Path) -> dict[str, Any]:
    """The run.json of the run that produced ``model_dir`` (``{}`` for any other model)."""
    manifest = model_dir / RUN_MANIFEST
    if not manifest.exists():
        return {}
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{manifest}: unreadable run manifest: {exc}") from None


def run_profile(model_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """Profile name and options recorded in a run's ``run.json`` (runs without a config file)."""
    profile = run_manifest(model_dir).get("profile") or {}
    return profile.get("name"), dict(profile.get("options") or {})


@attrs.frozen
class GenerationSetup:
    """Where everything ``trainer generate`` uses comes from (see :func:`generation_setup`)."""

    cfg: Any  # TrainerConfig
    model_dir: Path
    tokenizer_dir: Path
    chat_template: str
    run_dir: Path | None
    #: an adapter run's checkpoint: its ``adapter/``, put on the base model (``model_dir``)
    adapter_dir: Path | None = None


def generation_setup(model_dir: str, profile_name: str | None = None,
                     chat_template: str | None = None,
                     option_overrides: dict[str, Any] | None = None,
                     max_new_tokens: int | None = None,
                     config_file: Path | None = None) -> GenerationSetup:
    """Resolve the config, tokenizer directory and chat template for ``model_dir``.

    A run (or checkpoint) starts from the run's ``trainer_config.json``. Its tokenizer is the
    one saved with the model (in the checkpoint or the run directory, carrying the training
    template), else the one training loaded. Its chat template is the run's: ``chatml`` stays
    the built-in, anything else is the template saved with the tokenizer (so a Jinja file that
    moved since training still applies). Any other model directory uses the defaults.
    ``config_file`` names the training config to use instead of a run's own (a daemon home's
    ``config.json`` for its published models, which carry no run files).
    """
    from trainer_core.config import read_recorded_config, resolve
    from trainer_core.model.adapters import ADAPTER_DIR, adapter_weights_file

    path = Path(model_dir).expanduser()
    run_dir = run_directory(path)
    adapter_dir = None
    if not (path / "config.json").is_file():
        if adapter_weights_file(path) is None or run_dir is None:
            raise UserError(f"--model {model_dir}: not a model directory (no config.json)")
        adapter_dir = path / ADAPTER_DIR  # an adapter run's checkpoint: base + adapter
    source = config_file or (run_dir / CONFIG_FILE if run_dir else None)
    # The run's settings, never its permissions: trust_remote_code only from the user.
    tree: dict[str, Any] = read_recorded_config(source) if source else {}
    recorded = dict(tree.get("profile") or {})
    manifest_dir = run_dir or path  # older runs (and some copies) have run.json only
    if not recorded:
        name, options = run_profile(manifest_dir)
        recorded = {"name": name, "options": options} if name else {}
    name = profile_name or recorded.get("name") or "plain_sft"
    if name == recorded.get("name"):
        from trainer_core.plugins.registry import missing_profile_hint

        hint = missing_profile_hint(name, run_manifest(manifest_dir))
        if hint is not None:
            raise UserError(f"--model {model_dir}: {hint}")
    options = dict(recorded.get("options") or {}) if name == recorded.get("name") else {}
    for key, value in (option_overrides or {}).items():
        if not key.startswith("profile.options."):
            raise UserError(f"--set {key}: only profile.options.* can be set here")
        options[key.removeprefix("profile.options.")] = value
    model = dict(tree.get("model") or {})
    weights = path
    if adapter_dir is not None:
        from trainer_core.model.loading import model_directory

        weights = model_directory(resolve(file_data=tree).config)
    # The weights loaded here are complete (merged, or the base the adapter is put on).
    model["adapter"] = "none"
    tokenizer_dir = next((d for d in (path, run_dir) if d is not None and has_tokenizer(d)), None)
    recorded_template = model.get("chat_template", "chatml")
    if chat_template is None and source is not None and recorded_template != "chatml" \
            and tokenizer_dir is not None:
        chat_template = "tokenizer"  # the saved tokenizer carries the training template
    if tokenizer_dir is None and run_dir is not None:
        # A checkpoint of a run that has not saved its model yet: the tokenizer training used.
        from trainer_core.config import TrainerConfig
        from trainer_core.model.loading import model_directory

        base = resolve(file_data=tree).config if tree else TrainerConfig()
        tokenizer_dir = Path(base.model.tokenizer or model_directory(base))
    model.update(path=str(weights), tokenizer=str(tokenizer_dir or path))
    if chat_template is not None:
        model["chat_template"] = chat_template
    tree = {**tree, "model": model, "profile": {**recorded, "name": name, "options": options}}
    # A run's own resume/output settings mean nothing here.
    tree.pop("output", None)
    cli = {} if max_new_tokens is None else {"monitoring.max_new_tokens": max_new_tokens}
    cfg = resolve(file_data=tree, cli=cli).config
    return GenerationSetup(cfg, weights, Path(cfg.model.tokenizer or path),
                           cfg.model.chat_template, run_dir, adapter_dir)


def run_generate(model_dir: str, profile_name: str | None, prompt: str | None,
                 dataset: str | None, count: int, max_new_tokens: int | None,
                 use_processors: bool, option_overrides: dict[str, Any],
                 chat_template: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 progress: Callable[[int, int], None] | None = None,
                 constrain: str | None = None) -> Iterator[dict[str, Any]]:
    """Generate for ``--prompt`` or the first ``count`` rows of ``--dataset``.

    ``constrain`` (strict / soft / off) overrides ``monitoring.constrain``; ``use_processors``
    false means off. Yields one record (prompt, output, reference, scores; with a format also
    ``format``, ``format_failed`` and ``format_ok`` among the scores) per row, in order, batch
    by batch; ``progress(done, total)`` is called after each batch.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    setup = generation_setup(model_dir, profile_name, chat_template, option_overrides,
                             max_new_tokens)
    cfg = setup.cfg

    from trainer_core.generate.previews import preview_prompts
    from trainer_core.plugins.registry import build_profile

    profile = build_profile(cfg)
    if prompt is not None:
        rows = [{"messages": [{"role": "user", "content": prompt},
                              {"role": "assistant", "content": "(none)"}]}]
    else:
        from trainer_core.data.rows import RowFormat, check_rows, read_rows

        assert dataset is not None  # the CLI requires exactly one of prompt / dataset
        rows, problems = read_rows(dataset, RowFormat.from_config(cfg.data))
        check_rows(problems, "error", dataset)
        rows = rows[:count]
    prompts = preview_prompts(rows, profile, len(rows), cfg.data.seed)
    if prompt is not None:
        prompts[0]["reference"] = None  # a bare --prompt has no reference answer

    from trainer_core.data.chat import render_generation_prompt, resolve_template
    from trainer_core.data.tokenizer import load_tokenizer
    from trainer_core.generate.previews import (
        answer_formats,
        format_scores,
        generation_limit,
        generation_tools,
    )
    from trainer_core.generate.processors import generate
    from trainer_core.model.adapters import load_kwargs
    from trainer_core.model.loading import load_model, pick_device

    tokenizer = load_tokenizer(str(setup.tokenizer_dir),
                               trust_remote_code=cfg.model.trust_remote_code)
    template = resolve_template(setup.chat_template, tokenizer)
    limit = generation_limit(cfg.monitoring.max_new_tokens, [p["reference"] for p in prompts],
                             tokenizer, cfg.hyperparams.max_length)
    mode = "off" if not use_processors else (constrain or cfg.monitoring.constrain)
    formats = answer_formats(profile, prompts)
    device = pick_device(cfg)
    model = load_model(setup.model_dir, cfg, device, extra=load_kwargs(cfg, device))
    if setup.adapter_dir is not None:
        from trainer_core.model.adapters import attach

        model = attach(model, setup.adapter_dir)
    model.eval()
    total = len(prompts)
    if progress is not None:
        progress(0, total)
    for start in range(0, total, batch_size):
        batch = prompts[start:start + batch_size]
        texts = [render_generation_prompt(p["messages"], template, tokenizer) for p in batch]
        # Fresh processors per batch: they keep per-row state.
        processors, constrained = generation_tools(
            profile, tokenizer, cfg, formats[start:start + batch_size], mode)
        outputs = generate(model, tokenizer, texts, processors, limit, formats=constrained)
        for p, out, fmt in zip(batch, outputs, formats[start:start + batch_size], strict=True):
            scores = profile.score(out, p["example"])
            if p["reference"] is None:  # nothing to compare with
                scores = {k: v for k, v in scores.items() if "reference" not in k}
            own, failed = format_scores(fmt, out)
            record = {"prompt": p["messages"][-1]["content"], "output": out,
                      "reference": p["reference"], "scores": {**own, **scores}}
            if fmt is not None:
                record["format"] = fmt.describe()
                record["format_failed"] = failed
            yield record
        if progress is not None:
            progress(start + len(batch), total)
