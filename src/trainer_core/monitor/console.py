"""What a run prints: the plan (``--dry-run``), preview lines and the final summary."""

from __future__ import annotations

from typing import Any

from trainer_core.config import TrainerConfig, to_dict
from trainer_core.monitor.progress import format_duration


def print_plan(cfg: TrainerConfig, s: dict[str, Any], stream: Any) -> None:
    import json

    d = s["data"]
    lines = [
        "run plan",
        f"  profile      {s['profile']['name']} v{s['profile']['version']} "
        f"options={json.dumps(s['profile']['options'], ensure_ascii=False)}",
        f"  model        {s['model']} ({s['parameters'] or '?'} parameters)",
        f"  output       {s['output_dir']}",
        f"  data         {d['train_rows']} train rows, {d['validation_rows']} validation rows; "
        f"skipped invalid: {d['skipped_invalid'] or 'none'}",
        f"  examples     {d['train'].get('rows_kept')} kept, dropped: "
        f"{d['train'].get('dropped') or 'none'}",
        *[f"  dropped row  {p}" for p in d["train"].get("problems") or []],
        f"  tokens       {d['train'].get('total_tokens')} total, {d['train'].get('trained_tokens')} "
        "trained per epoch",
        f"  steps        {s['steps']} x {s['examples_per_step']} examples "
        f"(warmup {s['warmup_steps']})",
        *([_adapter_line(s["adapter"])] if s.get("adapter") else []),
        f"  memory       ~{s['estimated_memory_gb']} GB peak (runtime, weights, grads, AdamW, "
        "activations, loss logits)",
        "config",
        json.dumps(to_dict(cfg), indent=2),
    ]
    stream.write("\n".join(lines) + "\n")


def _adapter_line(a: dict[str, Any]) -> str:
    share = 100 * a["trainable_parameters"] / max(a["total_parameters"], 1)
    kind = f"{a['kind']}{' (DoRA)' if a.get('use_dora') else ''} r={a['rank']}"
    return (f"  adapter      {kind}: {a['trainable_parameters']:,} trainable of "
            f"{a['total_parameters']:,} parameters ({share:.2f}%)")


def print_summary(s: dict[str, Any], stream: Any) -> None:
    loss_start = s["loss_start"]
    lines = [
        f"run {s['state']}: {s['steps_done']}/{s['steps']} steps, "
        f"{s['tokens_trained']:,} trained tokens ({s['tokens_seen']:,} seen)",
        f"  loss {loss_start:.4f} -> {s['loss_end']:.4f}" if loss_start is not None
        else "  loss n/a",
        f"  eval loss {s['eval_loss']:.4f}" if s.get("eval_loss") is not None else "",
        f"  previews {s['preview_scores']}" if s.get("preview_scores") else "",
        f"  wall time {format_duration(s['wall_time_s'])} ({s['tokens_per_s']} tok/s)",
        f"  model in {s['output_dir']}" if s["state"] == "completed"
        else f"  no final model written; see {s['output_dir']}/status.json",
    ]
    stream.write("\n".join(x for x in lines if x) + "\n")


def short_scores(scores: dict[str, Any]) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in scores.items())
