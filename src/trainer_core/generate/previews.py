"""Previews: generate for held-out prompts with the profile's processors, and score them.

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


def run_previews(model: Any, tokenizer: Any, profile: Any, prompts: list[dict[str, Any]],
                 cfg: TrainerConfig, step: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Generate for the preview prompts with the profile's processors and score each output.

    Returns the records (step, prompt, output, reference, scores) and the scores averaged over
    them as ``preview/<score>``; writing and printing them is the listeners' job.
    """
    from trainer_core.data.chat import render_generation_prompt
    from trainer_core.generate.processors import generate
    from trainer_core.plugins.registry import collect_logits_processors

    if not prompts:
        return [], {}
    texts = [render_generation_prompt(p["messages"], cfg.model.chat_template, tokenizer)
             for p in prompts]
    processors = collect_logits_processors(profile, tokenizer, cfg)
    was_training = model.training
    model.eval()
    limit = generation_limit(cfg.monitoring.max_new_tokens, [p["reference"] for p in prompts],
                             tokenizer, cfg.hyperparams.max_length)
    if cfg.monitoring.preview_backend == "local":
        outputs = generate(model, tokenizer, texts, processors, limit)
    else:  # a running `trainer serve` generates them (generate/remote.py)
        from trainer_core.generate.remote import remote_generate

        outputs = remote_generate(cfg.monitoring.preview_backend,
                                  [p["messages"] for p in prompts], limit)
    model.train(was_training)
    records = []
    for p, text in zip(prompts, outputs, strict=False):
        try:
            scores = profile.score(text, p["example"])
        except Exception as exc:  # name the plugin: the user did not write this code
            from trainer_core.errors import PluginError
            from trainer_core.plugins.registry import profile_plugin_name

            raise PluginError(profile_plugin_name(profile), f"{profile.name}.score", exc) from exc
        record = {"step": step, "prompt": p["messages"][-1]["content"], "output": text,
                  "reference": p["reference"], "scores": scores}
        records.append(record)
    keys = sorted({k for r in records for k in r["scores"]})
    aggregate = {f"preview/{k}": sum(float(r["scores"].get(k, 0)) for r in records) / len(records)
                 for k in keys}
    return records, aggregate
