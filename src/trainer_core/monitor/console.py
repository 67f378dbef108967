"""What a run prints: the plan (``--dry-run``), preview lines and the final summary."""

from __future__ import annotations

from typing import Any

from trainer_core.monitor.progress import format_duration


def print_plan(s: dict[str, Any], stream: Any) -> None:
    """The plan of ``trainer run --dry-run`` (the resolved config is printed only on request:
    ``--verbose``, or ``--json`` where it is a key of the summary)."""
    import json

    d = s["data"]
    lines = [
        "run plan",
        f"  profile      {s['profile']['name']} v{s['profile']['version']} "
        f"options={json.dumps(s['profile']['options'], ensure_ascii=False)}",
        f"  model        {s['model']} ({s['parameters'] or '?'} parameters)",
        f"  output       {s['output_dir']}",
        f"  data         {d['train_rows']} train rows, {d['validation_rows']} validation rows; "
        f"skipped invalid: {_counts(d['skipped_invalid'])}",
        f"  examples     {d['train'].get('rows_kept')} kept, dropped: "
        f"{_counts(d['train'].get('dropped'))}",
        *([f"  validation   {d['validation'].get('rows_kept')} kept, dropped: "
           f"{_counts(d['validation'].get('dropped'))}"] if d.get("validation") else []),
        *[f"  dropped row  {p}" for p in d["train"].get("problems") or []],
        *[f"  dropped row  {p}" for p in (d.get("validation") or {}).get("problems") or []],
        f"  tokens       {d['train'].get('total_tokens')} total, {d['train'].get('trained_tokens')} "
        "trained per epoch",
        f"  steps        {s['steps']} x {s['examples_per_step']} examples "
        f"(warmup {s['warmup_steps']})",
        *([_adapter_line(s["adapter"])] if s.get("adapter") else []),
        f"  memory       ~{s['estimated_memory_gb']} GB peak (runtime, weights, grads, AdamW, "
        "activations, loss logits)",
    ]
    stream.write("\n".join(lines) + "\n")


def _adapter_line(a: dict[str, Any]) -> str:
    share = 100 * a["trainable_parameters"] / max(a["total_parameters"], 1)
    kind = f"{a['kind']}{' (DoRA)' if a.get('use_dora') else ''} r={a['rank']}"
    return (f"  adapter      {kind}: {a['trainable_parameters']:,} trainable of "
            f"{a['total_parameters']:,} parameters ({share:.2f}%)")


def _counts(counts: dict[str, int] | None) -> str:
    """``profile_invalid 105, too_long 2``, or ``none``."""
    shown = ", ".join(f"{k} {v}" for k, v in sorted((counts or {}).items()) if v)
    return shown or "none"


def print_summary(s: dict[str, Any], stream: Any) -> None:
    loss_start = s["loss_start"]
    lines = [
        f"run {s['state']}: {s['steps_done']}/{s['steps']} steps, "
        f"{s['tokens_trained']:,} trained tokens ({s['tokens_seen']:,} seen)",
        f"  loss {loss_start:.4f} -> {s['loss_end']:.4f}" if loss_start is not None
        else "  loss n/a",
        f"  eval loss {s['eval_loss']:.4f}" if s.get("eval_loss") is not None else "",
        f"  previews {_scores(s['preview_scores'])}" if s.get("preview_scores") else "",
        f"  wall time {format_duration(s['wall_time_s'])} ({s['tokens_per_s']} tok/s)",
        f"  model in {s['output_dir']}" if s["state"] == "completed"
        else f"  no final model written; see {s['output_dir']}/status.json",
        *(next_steps(s["output_dir"]) if s["state"] == "completed" else []),
    ]
    stream.write("\n".join(x for x in lines if x) + "\n")


def next_steps(output_dir: str) -> list[str]:
    """What to do with a finished run, as commands that work as printed in a fresh shell."""
    import shlex
    from pathlib import Path

    trainer = venv_tool("trainer")
    run = shlex.quote(output_dir)
    parent = shlex.quote(str(Path(output_dir).parent))
    return ["next:",
            f"  {trainer} generate --model {run} --prompt 'What is 7 + 5?'",
            f"  {trainer} watch {run} --once",
            f"  {trainer} dashboard {parent}",
            f"  {trainer} plot {run}"]


def venv_tool(name: str) -> str:
    """How to call ``name`` from this environment's bin directory in a fresh shell (no
    activated venv): ``.venv/bin/trainer`` under the current directory, else its absolute
    path; the bare name when the environment has no such script."""
    import os
    import sys
    from pathlib import Path

    path = Path(sys.executable).parent / name
    if not path.exists():
        return name
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def _scores(scores: dict[str, Any]) -> str:
    """``has_stop_suffix 1.00, has_think_prefix 0.75`` (the mean of each preview score)."""
    return ", ".join(f"{k.removeprefix('preview/')} "
                     f"{v:.2f}" if isinstance(v, (int, float)) else f"{k} {v}"
                     for k, v in scores.items())


def short_scores(scores: dict[str, Any]) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in scores.items())
