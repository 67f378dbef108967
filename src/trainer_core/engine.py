"""The training recipe: ``trainer run`` from resolved config to a saved model, top to bottom.

We use our own loop rather than ``transformers.Trainer``: the loss must be normalised by the
trained tokens of the whole optimizer step (not a mean of micro-batch means), packed batches
carry per-example position ids, resume must restore the exact data position and learning-rate
schedule, a NaN must never reach a checkpoint, and the GPU path swaps in compiled and fused
pieces. Each of those fights the Trainer's defaults; a short loop states them plainly.

Flow of :func:`run_training`:
  1. profile + data: read and validate every row before any model is loaded;
  2. model directory and lock check (before any work is written);
  3. tokenizer, profile transform, chat template, labels (cached preprocessing);
  4. plan (printed and returned for ``--dry-run``);
  5. model, optimizer, schedule; resume state if asked;
  6. the loop: micro-batches -> summed loss / trained tokens -> step; logging, status, eval,
     previews, checkpoints; SIGINT/SIGTERM and NaN handling;
  7. final model, tokenizer, manifest and summary.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from trainer_core import __version__
from trainer_core.config import Resolved, TrainerConfig, config_hash, to_dict
from trainer_core.errors import UserError
from trainer_core.monitor import (
    Progress,
    StatusWriter,
    append_jsonl,
    format_duration,
    write_json_atomic,
)
from trainer_core.speed import SpeedPlan, plan_speed, tune_cpu_allocator

RUN_MANIFEST = "run.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
PREVIEWS_FILE = "previews.jsonl"
CONFIG_FILE = "trainer_config.json"

# --------------------------------------------------------------------------- small helpers


def build_profile(cfg: TrainerConfig, today: dt.date | None = None) -> Any:
    from trainer_core.plugins import get_profile_class

    cls = get_profile_class(cfg.profile.name)
    return cls.from_options(cfg.profile.options, today=today)


def model_directory(cfg: TrainerConfig) -> Path:
    """The configured model directory, or the embedded tiny model (built once, cached)."""
    if cfg.model.path is not None:
        path = Path(cfg.model.path).expanduser()
        if not path.is_dir():
            raise UserError(f"model.path: {path} is not a directory (models are loaded from "
                            "local directories only; nothing is downloaded)")
        return path
    from trainer_core.demo import ensure_tiny_model

    return ensure_tiny_model(seed=cfg.hyperparams.seed)


def pick_device(cfg: TrainerConfig) -> Any:
    import torch

    want = cfg.environment.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("environment.device: cuda requested but no CUDA device is available")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def pick_precision(cfg: TrainerConfig, device: Any) -> str:
    """auto: bf16 on a GPU that has it, else fp32 (CPU autocast is slower than fp32 here)."""
    import torch

    p = cfg.hyperparams.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if p == "fp16" and device.type != "cuda":
        raise UserError("hyperparams.precision: fp16 needs a CUDA device; use bf16 or fp32")
    return p


def weight_dtype(cfg: TrainerConfig) -> Any:
    """Master weights stay fp32 unless model.dtype says otherwise (mixed precision via autocast)."""
    import torch

    return {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[cfg.model.dtype]


def autocast(device: Any, precision: str) -> Any:
    import torch

    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def quiet_hf() -> None:
    """No hub traffic and no library progress bars: ours is the one the user reads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:  # only preprocessing needs datasets; loading a model (bench/throughput.py) does not
        import datasets
    except ImportError:
        return
    datasets.disable_progress_bars()


def load_model(model_dir: Path, cfg: TrainerConfig, device: Any, attn: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    quiet_hf()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            local_files_only=True,
            trust_remote_code=cfg.model.trust_remote_code,
            dtype=weight_dtype(cfg),
            attn_implementation=attn or plan_speed(cfg, device).attn_implementation,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model from {model_dir}: {exc}") from exc
    return model.to(device)


def check_model_locked(model: Any, facts: dict[str, Any]) -> None:
    """The loaded model must be what the lock says (architecture, vocab, context)."""
    from trainer_core.lock import mismatches

    mc = model.config
    actual = {
        "model_architecture": (mc.architectures or [type(model).__name__])[0],
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "max_context_length": getattr(mc, "max_position_embeddings", None),
    }
    diffs = mismatches(facts, actual)
    if diffs:
        text = "; ".join(f"{k}: locked {a!r}, model has {b!r}" for k, a, b in diffs)
        raise UserError(f"the loaded model does not match the locked fields: {text}")


def weights_finite(model: Any) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def make_optimizer(model: Any, cfg: TrainerConfig, device: Any) -> Any:
    import torch

    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.hyperparams.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW is one kernel for all parameters on CUDA; the foreach path elsewhere.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.hyperparams.learning_rate, betas=(0.9, 0.999),
                             eps=1e-8, fused=fused)


def lr_lambda(total_steps: int, warmup: int, kind: str):
    """Multiplier of the peak LR at step ``s`` (a pure function: resume continues the curve)."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def warmup_steps(cfg: TrainerConfig, total_steps: int) -> int:
    hp = cfg.hyperparams
    if hp.warmup_steps is not None:
        return min(hp.warmup_steps, total_steps)
    return int(round(hp.warmup_ratio * total_steps))


def default_output_dir(profile_name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{profile_name}-{stamp}"


def dataset_path(cfg: TrainerConfig) -> Path:
    if cfg.data.dataset is not None:
        return Path(cfg.data.dataset)
    from trainer_core.demo import sample_dataset_path

    return sample_dataset_path()


# --------------------------------------------------------------------------- one step


@attrs.define
class TrainingSetup:
    """Everything one optimizer step needs, built by :func:`prepare_training`."""

    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any  # a GradScaler for fp16, else None
    device: Any
    precision: str
    speed: SpeedPlan


def prepare_training(cfg: TrainerConfig, model_dir: Path, total_steps: int,
                     facts: dict[str, Any] | None = None) -> TrainingSetup:
    """Device, precision, speed plan, model, AdamW and the LR schedule, as ``trainer run`` does.

    ``bench/throughput.py`` builds its "trainer" variant with this too, so it measures exactly
    what a run would do.
    """
    import torch

    hp = cfg.hyperparams
    device = pick_device(cfg)
    precision = pick_precision(cfg, device)
    torch.manual_seed(hp.seed)
    speed = plan_speed(cfg, device)
    if device.type == "cpu":
        tune_cpu_allocator()
    model = load_model(model_dir, cfg, device, speed.attn_implementation)
    if facts is not None:
        check_model_locked(model, facts)
    if hp.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    model = speed.prepare(model)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup_steps(cfg, total_steps), hp.lr_scheduler))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return TrainingSetup(model, optimizer, scheduler, scaler, device, precision, speed)


def train_step(setup: TrainingSetup, batches: list[dict[str, Any]], n_trained: int,
               max_grad_norm: float | None) -> tuple[float, float, float]:
    """One optimizer step over ``batches``; returns ``(loss, grad_norm, lr)``.

    The loss of each micro-batch is a sum divided by the trained tokens of the whole step, so
    gradients accumulate to the token-weighted mean. A non-finite loss or gradient norm skips
    the update (the caller stops the run); fp16's scaler handles its own overflow steps.
    """
    import torch

    model, optimizer, scaler = setup.model, setup.optimizer, setup.scaler
    step_loss = 0.0
    for batch in batches:
        with autocast(setup.device, setup.precision):
            loss, _ = setup.speed.loss(model, to_device(batch, setup.device))
            scaled = loss / max(n_trained, 1)
        (scaler.scale(scaled) if scaler else scaled).backward()
        step_loss += float(scaled.detach())
    if scaler:
        scaler.unscale_(optimizer)
    # The total norm is computed either way: a non-finite one means a broken step.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                     max_grad_norm or float("inf")))
    lr = float(setup.scheduler.get_last_lr()[0])
    if not math.isfinite(step_loss) or (scaler is None and not math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm, lr
    if scaler:
        scaler.step(optimizer)
        scaler.update()
        grad_norm = grad_norm if math.isfinite(grad_norm) else 0.0  # skipped by the scaler
    else:
        optimizer.step()
    setup.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, lr


# --------------------------------------------------------------------------- data


def load_rows(cfg: TrainerConfig) -> tuple[list, list, dict[str, int]]:
    """Validated training and validation rows, plus counts of skipped rows by reason."""
    from trainer_core.data import check_rows, read_rows, split_rows

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
    from trainer_core.preprocess import preprocess

    ds, stats = preprocess(
        rows, profile, tokenizer, cfg.model.chat_template, cfg.hyperparams.max_length,
        cfg.data.seed + seed_offset, cfg.data.truncation, cfg.data.cache_dir, source=source,
    )
    return ds, stats.to_dict()


# --------------------------------------------------------------------------- evaluation


def evaluate(model: Any, examples: list[dict[str, Any]], cfg: TrainerConfig, device: Any,
             precision: str, pad_id: int, speed: SpeedPlan) -> float | None:
    """Token-weighted mean loss over the validation examples."""
    import torch

    from trainer_core.batching import micro_batches

    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    budget = token_budget(cfg)
    with torch.no_grad(), autocast(device, precision):
        for batch in micro_batches(examples, cfg.data.packing, cfg.hyperparams.batch_size,
                                   budget, pad_id, speed.pad_to_multiple):
            loss, n = speed.loss(model, to_device(batch, device))
            total += float(loss)
            count += n
    model.train()
    return total / count if count else None


def token_budget(cfg: TrainerConfig) -> int:
    hp = cfg.hyperparams
    return cfg.data.max_tokens_per_batch or hp.batch_size * hp.max_length


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v)
            for k, v in batch.items()}


# --------------------------------------------------------------------------- previews


def preview_prompts(val_rows: list, profile: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """Held-out examples, transformed exactly as in training, split into prompt + reference."""
    from trainer_core.data import example_of
    from trainer_core.preprocess import example_rng

    out = []
    for i, row in enumerate(val_rows[:n]):
        ex = profile.transform(example_of(row), i, example_rng(seed, i))
        msgs = ex["messages"]
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        out.append({"messages": msgs[:last], "reference": msgs[last]["content"], "example": ex})
    return out


def run_previews(model: Any, tokenizer: Any, profile: Any, prompts: list[dict[str, Any]],
                 cfg: TrainerConfig, step: int, out_dir: Path, progress: Progress
                 ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Generate for the preview prompts with the profile's processors; score and record."""
    from trainer_core.chat import render_generation_prompt
    from trainer_core.generation import generate
    from trainer_core.plugins import collect_logits_processors

    if not prompts:
        return [], {}
    texts = [render_generation_prompt(p["messages"], cfg.model.chat_template, tokenizer)
             for p in prompts]
    processors = collect_logits_processors(profile, tokenizer, cfg)
    was_training = model.training
    model.eval()
    outputs = generate(model, tokenizer, texts, processors, cfg.monitoring.max_new_tokens)
    model.train(was_training)
    records = []
    for p, text in zip(prompts, outputs, strict=False):
        scores = profile.score(text, p["example"])
        record = {"step": step, "prompt": p["messages"][-1]["content"], "output": text,
                  "reference": p["reference"], "scores": scores}
        records.append(record)
        append_jsonl(out_dir / PREVIEWS_FILE, record)
        progress.line(f"  preview@{step}: {text[:100]!r} {_short_scores(scores)}")
    keys = sorted({k for r in records for k in r["scores"]})
    aggregate = {f"preview/{k}": sum(float(r["scores"].get(k, 0)) for r in records) / len(records)
                 for k in keys}
    return records, aggregate


def _short_scores(scores: dict[str, Any]) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in scores.items())


# --------------------------------------------------------------------------- signals


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. embedded): no handlers
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- the recipe


def run_training(resolved: Resolved, dry_run: bool = False, unlock: bool = False,
                 quiet: bool = False, stream: Any = None) -> dict[str, Any]:
    """Run (or plan, with ``dry_run``) one training run; returns the summary dict."""
    cfg = resolved.config
    out_stream = stream or sys.stderr
    started = time.time()

    # 1. profile and data, validated before any model is touched
    profile = build_profile(cfg)
    train_rows, val_rows, skipped = load_rows(cfg)

    quiet_hf()

    # 2. model directory and lock (fails before anything is written)
    from trainer_core.lock import (
        check_and_write_lock,
        check_model_against_config,
        expected_facts,
        model_facts,
    )

    model_dir = model_directory(cfg)
    base_model = cfg.locked.base_model or (cfg.model.path or "trainer/tiny-qwen3-demo")
    check_model_against_config(cfg, model_facts(model_dir))
    facts = expected_facts(cfg, model_dir, base_model)
    output_dir = Path(cfg.output.output_dir) if cfg.output.output_dir else default_output_dir(
        cfg.profile.name)
    resume_from = None
    if cfg.output.resume:
        from trainer_core.checkpoint import find_resume_checkpoint

        resume_from = find_resume_checkpoint(output_dir, cfg.output.resume)
    elif (output_dir / "checkpoints").exists() and not dry_run:
        raise UserError(f"{output_dir} already holds checkpoints of a run; pass --resume to "
                        "continue it, or choose another --output-dir")
    if not dry_run:
        check_and_write_lock(output_dir, facts, unlock=unlock)

    # 3. tokenizer + preprocessing (cached)
    from trainer_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or str(model_dir),
                               trust_remote_code=cfg.model.trust_remote_code)
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

    # 4. plan
    from trainer_core.batching import count_trained, micro_batches, plan_steps

    hp = cfg.hyperparams
    per_step = hp.batch_size * hp.gradient_accumulation
    plan = plan_steps(len(train_examples), per_step, hp.num_epochs, hp.max_steps, cfg.data.seed,
                      cfg.data.shuffle)
    n_params = _param_count(model_dir)
    summary: dict[str, Any] = {
        "state": "planned",
        "output_dir": str(output_dir),
        "model": str(model_dir),
        "profile": {"name": profile.name, "version": profile.version,
                    "options": profile.options_dict()},
        "data": {"train_rows": len(train_rows), "validation_rows": len(val_rows),
                 "skipped_invalid": skipped, "train": train_stats, "validation": val_stats},
        "steps": plan.total_steps,
        "examples_per_step": per_step,
        "warmup_steps": warmup_steps(cfg, plan.total_steps),
        "estimated_memory_gb": _memory_estimate_gb(n_params, hp, cfg),
        "parameters": n_params,
    }
    if dry_run:
        _print_plan(cfg, summary, out_stream)
        return summary

    # 5. model, optimizer, schedule, resume
    setup = prepare_training(cfg, model_dir, plan.total_steps, facts)
    model, optimizer, scheduler, scaler = (setup.model, setup.optimizer, setup.scheduler,
                                           setup.scaler)
    device, precision, speed = setup.device, setup.precision, setup.speed
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / CONFIG_FILE, to_dict(cfg))

    state: dict[str, Any] = {"step": 0, "tokens_trained": 0, "tokens_seen": 0,
                             "first_loss": None, "history": []}
    if resume_from is not None:
        from trainer_core.checkpoint import load_checkpoint

        state = load_checkpoint(resume_from, model, optimizer, scheduler, scaler)
    pad_id = tokenizer.pad_token_id
    budget = token_budget(cfg)
    progress = Progress(plan.total_steps, quiet, out_stream)
    status = StatusWriter(output_dir / STATUS_FILE, cfg.monitoring.status_interval_s, {
        "state": "running", "total_steps": plan.total_steps, "output_dir": str(output_dir),
        "started_at": started, "pid": os.getpid()})
    manifest = _manifest(cfg, profile, summary, train_rows, state)
    write_json_atomic(output_dir / RUN_MANIFEST, {**manifest, "state": "running"})
    prompts = preview_prompts(val_rows or train_rows, profile, cfg.monitoring.num_preview_samples,
                              cfg.data.seed + 1)
    progress.line(f"training {profile.name} on {len(train_examples)} examples for "
                  f"{plan.total_steps} steps ({precision}, {device.type}) -> {output_dir}"
                  + (f" (resumed at step {state['step']})" if resume_from else ""))

    # 6. the loop
    final_state = "completed"
    last_loss = float("nan")
    window_tokens, window_start = 0, time.time()
    loop_start = time.time()
    start_step = state["step"]
    eval_loss = None
    preview_scores: dict[str, float] = {}
    with StopRequested() as stop:
        for step in range(start_step, plan.total_steps):
            batch_examples = [train_examples[i] for i in plan.step_indices(step)]
            batches = micro_batches(batch_examples, cfg.data.packing, hp.batch_size, budget,
                                    pad_id, speed.pad_to_multiple)
            n_trained = count_trained(batches)
            step_loss, grad_norm, lr = train_step(setup, batches, n_trained, hp.max_grad_norm)
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                final_state = "failed"
                progress.line(f"error: loss {step_loss}, gradient norm {grad_norm} at step "
                              f"{step + 1}; stopping. The last good checkpoint is untouched and "
                              "no final model is written.")
                break

            done = step + 1
            tokens = sum(int(b["input_ids"].numel()) for b in batches)
            state["step"] = done
            state["tokens_trained"] += n_trained
            state["tokens_seen"] += tokens
            if state["first_loss"] is None:
                state["first_loss"] = step_loss
            last_loss = step_loss
            window_tokens += tokens
            elapsed = time.time() - window_start
            tok_s = window_tokens / elapsed if elapsed > 0 else 0.0
            rate = (done - start_step) / max(time.time() - loop_start, 1e-9)
            eta = (plan.total_steps - done) / rate if rate > 0 else float("inf")
            progress.show(done, step_loss, lr, tok_s, eta)
            status.update(step=done, loss=step_loss, lr=lr, tokens_per_s=tok_s, eta_s=eta,
                          epoch=plan.epoch_at(done))

            record: dict[str, Any] | None = None
            if done % cfg.environment.logging_steps == 0 or done == plan.total_steps:
                record = {"step": done, "epoch": round(plan.epoch_at(done), 4), "loss": step_loss,
                          "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s, "tokens_trained":
                          state["tokens_trained"], "time": time.time()}
                window_tokens, window_start = 0, time.time()
            at_end = done == plan.total_steps
            if val_examples and ((hp.eval_steps and done % hp.eval_steps == 0) or at_end):
                eval_loss = evaluate(model, val_examples, cfg, device, precision, pad_id, speed)
                record = {**(record or {"step": done}), "eval_loss": eval_loss}
                progress.line(f"step {done}: eval_loss {eval_loss:.4f}")
                status.update(eval_loss=eval_loss)
            mon = cfg.monitoring
            if mon.num_preview_samples and ((mon.preview_steps and done % mon.preview_steps == 0)
                                            or at_end):
                previews, preview_scores = run_previews(model, tokenizer, profile, prompts, cfg,
                                                        done, output_dir, progress)
                record = {**(record or {"step": done}), **preview_scores}
                status.update(previews=previews)
            if record is not None:
                state["history"].append(record)
                append_jsonl(Path(cfg.output.logging_dir or output_dir) / METRICS_FILE, record)
            if (hp.save_steps and done % hp.save_steps == 0 and not at_end) or (
                    stop.signal is not None):
                from trainer_core.checkpoint import save_checkpoint

                if not weights_finite(model):
                    final_state = "failed"
                    progress.line(f"error: non-finite weights after step {done}; stopping "
                                  "without saving. The last good checkpoint is untouched.")
                    break

                save_checkpoint(output_dir, done, model, optimizer, scheduler, scaler, state,
                                hp.save_total_limit)
            if stop.signal is not None:
                final_state = "interrupted"
                progress.line(f"stopped by signal {stop.signal} at step {done}; checkpoint saved. "
                              "Continue with --resume.")
                break
    progress.close()

    # 7. outputs
    wall = time.time() - started
    train_time = time.time() - loop_start
    if final_state == "completed" and not weights_finite(model):
        final_state = "failed"
        progress.line("error: non-finite weights at the end of training; no model written.")
    if final_state == "completed":
        model.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
    summary.update({
        "state": final_state,
        "steps_done": state["step"],
        "tokens_trained": state["tokens_trained"],
        "tokens_seen": state["tokens_seen"],
        "loss_start": state["first_loss"],
        "loss_end": last_loss,
        "eval_loss": eval_loss,
        "preview_scores": preview_scores,
        "wall_time_s": round(wall, 2),
        "train_time_s": round(train_time, 2),
        "tokens_per_s": round(state["tokens_seen"] / train_time, 1) if train_time > 0 else None,
        "precision": precision,
        "device": str(device),
    })
    status.update(force=True, state=final_state, step=state["step"])
    write_json_atomic(output_dir / RUN_MANIFEST, {**manifest, **_final_fields(summary)})
    if not quiet:
        _print_summary(summary, out_stream)
    return summary


# --------------------------------------------------------------------------- reporting


def _examples(ds: Any) -> list[dict[str, Any]]:
    """Materialise a preprocessed dataset as plain lists (fast random access in the loop)."""
    cols = ds.to_dict()
    return [{"input_ids": ids, "labels": labels}
            for ids, labels in zip(cols["input_ids"], cols["labels"], strict=False)]


def _param_count(model_dir: Path) -> int | None:
    """Parameter count from the safetensors header (no weights loaded)."""
    import json
    import struct

    total = 0
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                total += math.prod(v["shape"])
    return total


def _memory_estimate_gb(n_params: int | None, hp: Any, cfg: TrainerConfig) -> float | None:
    """Weights + grads + AdamW states in fp32 (16 bytes/param) plus a rough activation term."""
    if not n_params:
        return None
    tokens = token_budget(cfg)
    return round((16 * n_params + tokens * 4096 * 4) / 2**30, 2)


def _manifest(cfg: TrainerConfig, profile: Any, summary: dict[str, Any], rows: list,
              state: dict[str, Any]) -> dict[str, Any]:
    import hashlib
    import importlib.metadata as md

    from trainer_core.plugins import get_registry

    plugins = sorted({(p.distribution, p.version) for p in get_registry().plugins.values()
                      if p.status == "ok"})
    data_file = dataset_path(cfg)
    return {
        "trainer_core_version": __version__,
        "profile": summary["profile"],
        "plugins": [{"distribution": d, "version": v} for d, v in plugins],
        "config_hash": config_hash(cfg),
        "dataset": str(data_file),
        "dataset_sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(),
        "data": summary["data"],
        "model": summary["model"],
        "torch_version": md.version("torch"),
        "transformers_version": md.version("transformers"),
        "started_at": time.time(),
    }


def _final_fields(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("state", "steps_done", "tokens_trained", "tokens_seen", "loss_start", "loss_end",
            "eval_loss", "preview_scores", "wall_time_s", "train_time_s", "tokens_per_s",
            "precision", "device")
    return {k: summary.get(k) for k in keys}


def _print_plan(cfg: TrainerConfig, s: dict[str, Any], stream: Any) -> None:
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
        f"  tokens       {d['train'].get('total_tokens')} total, {d['train'].get('trained_tokens')} "
        "trained per epoch",
        f"  steps        {s['steps']} x {s['examples_per_step']} examples "
        f"(warmup {s['warmup_steps']})",
        f"  memory       ~{s['estimated_memory_gb']} GB (fp32 weights, grads, AdamW + activations)",
        "config",
        json.dumps(to_dict(cfg), indent=2),
    ]
    stream.write("\n".join(lines) + "\n")


def _print_summary(s: dict[str, Any], stream: Any) -> None:
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


# --------------------------------------------------------------------------- preview command


def preview_text(cfg: TrainerConfig, count: int, color: bool) -> str:
    """``trainer preview``: transformed examples with trained tokens highlighted."""
    from trainer_core.preview import preview_examples
    from trainer_core.tokenizer import load_tokenizer

    profile = build_profile(cfg)
    train_rows, _, _ = load_rows(cfg)
    # No model given: the demo model uses the bundled tokenizer, so there is no need to build it.
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path,
                               trust_remote_code=cfg.model.trust_remote_code)
    return preview_examples(train_rows, profile, tokenizer, cfg.model.chat_template, count,
                            cfg.data.seed, color=color)
