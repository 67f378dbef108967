"""Previews: generate for held-out prompts held to the profile's format, and score them.

Used during training (every ``monitoring.preview_steps``) and by ``trainer generate``.
"""

from __future__ import annotations

from typing import Any

from trainer_core.config import TrainerConfig


def preview_prompts(val_rows: list, profile: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """Held-out examples, prepared exactly as in training (system prompt included), split into
    prompt + reference."""
    from trainer_core.data.preprocess import prepare_row
    from trainer_core.data.rows import LINE_KEY

    out = []
    for i, row in enumerate(val_rows[:n]):
        where = f"line {row[LINE_KEY]}" if row.get(LINE_KEY) else f"prompt {i + 1}"
        ex, _ = prepare_row(profile, row, i, seed, where)
        msgs = ex["messages"]
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        out.append({"messages": msgs[:last], "reference": msgs[last]["content"], "example": ex})
    return out


#: Generation limit when neither the config nor a reference answer gives one.
DEFAULT_MAX_NEW_TOKENS = 128


def generation_limit(configured: int | None, references: list[str | None], tokenizer: Any,
                     cap: int | None = None) -> int:
    """``configured`` when set; else room for the longest reference answer.

    That is its tokens plus the end-of-turn marker, plus a quarter (at least 16 tokens) of
    margin, at most ``cap``: a preview cut before the end of its answer would count as a format
    failure (no stop suffix) however well the model did. Without references: 128.
    """
    if configured is not None:
        return configured
    lengths = [len(tokenizer(ref, add_special_tokens=False)["input_ids"]) + 1
               for ref in references if ref is not None]
    if not lengths:
        return DEFAULT_MAX_NEW_TOKENS
    longest = max(lengths)
    limit = longest + max(16, longest // 4)
    return min(limit, cap) if cap else limit


def answer_formats(profile: Any, prompts: list[dict[str, Any]]) -> list[Any]:
    """The profile's answer format (or ``None``) for each prompt's answer."""
    out = []
    for p in prompts:
        try:
            out.append(profile.answer_format({**p["example"], "messages": p["messages"]}))
        except Exception as exc:  # name the plugin: the user did not write this code
            from trainer_core.errors import PluginError
            from trainer_core.plugins.registry import profile_plugin_name

            raise PluginError(profile_plugin_name(profile), f"{profile.name}.answer_format",
                              exc) from exc
    return out


def generation_tools(profile: Any, tokenizer: Any, cfg: TrainerConfig, formats: list[Any],
                     mode: str) -> tuple[list[Any], list[Any] | None]:
    """``(processors, formats)`` for ``generate()`` under ``mode`` (``monitoring.constrain``).

    strict: the formats, plus only the processors of the ``logits_processors`` hook (for any
    profile); when no prompt has a format, the same as soft. soft: the profile's processors and
    the hook's, no formats. off: nothing.
    """
    from trainer_core.plugins.registry import collect_logits_processors

    if mode == "off":
        return [], None
    if mode == "strict" and any(f is not None for f in formats):
        return collect_logits_processors(profile, tokenizer, cfg, own=False), formats
    processors = collect_logits_processors(profile, tokenizer, cfg)
    return processors, None


def format_scores(fmt: Any, text: str) -> tuple[dict[str, bool], str | None]:
    """``({"format_ok": ...}, failed part)`` of ``text`` against ``fmt`` (``({}, None)`` for
    no format)."""
    if fmt is None:
        return {}, None
    from trainer_core.plugins.answer_format import check_answer

    ok, failed = check_answer(fmt, text)
    return {"format_ok": ok}, (None if ok else failed)


def run_previews(model: Any, tokenizer: Any, profile: Any, prompts: list[dict[str, Any]],
                 cfg: TrainerConfig, step: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Generate for the preview prompts with the profile's processors and score each output.

    Generation follows ``monitoring.constrain`` (see :func:`generation_tools`). Returns the
    records (step, prompt, output, reference, scores; with a format also ``format`` and
    ``format_failed``, and ``format_ok`` among the scores) and the scores averaged over them as
    ``preview/<score>`` (``preview/format_ok`` included); writing and printing them is the
    listeners' job.
    """
    from trainer_core.data.chat import render_generation_prompt
    from trainer_core.generate.processors import generate

    if not prompts:
        return [], {}
    texts = [render_generation_prompt(p["messages"], cfg.model.chat_template, tokenizer)
             for p in prompts]
    formats = answer_formats(profile, prompts)
    processors, constrained = generation_tools(profile, tokenizer, cfg, formats,
                                               cfg.monitoring.constrain)
    was_training = model.training
    model.eval()
    limit = generation_limit(cfg.monitoring.max_new_tokens, [p["reference"] for p in prompts],
                             tokenizer, cfg.hyperparams.max_length)
    if cfg.monitoring.preview_backend == "local":
        outputs = generate(model, tokenizer, texts, processors, limit, formats=constrained)
    else:  # a running `trainer serve` generates them (generate/remote.py)
        from trainer_core.generate.remote import remote_generate

        outputs = remote_generate(cfg.monitoring.preview_backend,
                                  [p["messages"] for p in prompts], limit)
    model.train(was_training)
    records = []
    for p, text, fmt in zip(prompts, outputs, formats, strict=False):
        try:
            scores = profile.score(text, p["example"])
        except Exception as exc:  # name the plugin: the user did not write this code
            from trainer_core.errors import PluginError
            from trainer_core.plugins.registry import profile_plugin_name

            raise PluginError(profile_plugin_name(profile), f"{profile.name}.score", exc) from exc
        own, failed = format_scores(fmt, text)
        record = {"step": step, "prompt": p["messages"][-1]["content"], "output": text,
                  "reference": p["reference"], "scores": {**own, **scores}}
        if fmt is not None:
            record["format"] = fmt.describe()
            record["format_failed"] = failed
        records.append(record)
    keys = sorted({k for r in records for k in r["scores"]})
    aggregate = {f"preview/{k}": sum(float(r["scores"].get(k, 0)) for r in records) / len(records)
                 for k in keys}
    return records, aggregate
