"""One optimizer step, as ``trainer run``, the daemon and ``bench/throughput.py`` take it.

:func:`prepare_training` builds the model, AdamW and the learning-rate schedule, and chooses
the run's step engine once (:mod:`trainer_core.train.engine`: plain, CUDA, several processes);
:func:`train_step` and :func:`launch_step` run one step through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from trainer_core.config import TrainerConfig
from trainer_core.model import adapters
from trainer_core.model.fa4_warmup import warm_fa4_kernels
from trainer_core.model.graphs import TOKEN_MULTIPLE, graphs_wanted
from trainer_core.model.loading import (
    autocast,
    check_model_locked,
    enable_checkpointing,
    load_model,
    pick_device,
    pick_precision,
)
from trainer_core.model.speed import plan_speed
from trainer_core.model.tuning import tune_cpu_allocator, tune_cuda_allocator
from trainer_core.train.engine import LaunchedStep, TrainingSetup, choose_engine
from trainer_core.train.graph_update import UpdateGraphs
from trainer_core.train.update import adamw_step_of


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
    # Fused AdamW: one kernel over all parameters on CUDA, and on the CPU a vectorised loop
    # 5.6x faster than the default per-tensor path (demo model: 19 vs 107 ms a step; results
    # differ by float32 rounding, ~1e-8). Builds or devices without it use the default path.
    lr = cfg.hyperparams.learning_rate
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


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


def prepare_training(cfg: TrainerConfig, model_dir: Path, total_steps: int,
                     facts: dict[str, Any] | None = None,
                     schedule: Callable[[int], float] | None = None, parallel: Any = None
                     ) -> TrainingSetup:
    """Device, precision, speed plan, model, AdamW and the LR schedule, as ``trainer run`` does.

    ``parallel`` (several processes) wraps or shards the prepared model before the optimizer
    is built, so AdamW holds what each rank owns.

    ``bench/throughput.py`` builds its "trainer" variant with this too, so it measures exactly
    what a run would do. ``schedule`` replaces the run's LR multiplier (a function of the global
    step), for callers whose training has no fixed total, such as ``trainer daemon``.
    """
    import torch

    hp = cfg.hyperparams
    device = pick_device(cfg)
    precision = pick_precision(cfg, device)
    if device.type == "cuda":
        tune_cuda_allocator()
    torch.manual_seed(hp.seed)
    cfg = adapters.with_speed_switches(cfg, device)  # adapters: CUDA graphs off (no faster)
    speed = plan_speed(cfg, device)
    if speed.attention_kernel == "fa4":
        warm_fa4_kernels(model_dir)  # overlaps the model load and the blocks' compilation
    if device.type == "cpu":
        tune_cpu_allocator()
    model = load_model(model_dir, cfg, device, speed.attn_implementation,
                       adapters.load_kwargs(cfg, device))
    if facts is not None:
        check_model_locked(model, facts)
    model = adapters.wrap(model, cfg, parallel)  # adapters: a frozen base, trainable adapters
    checkpointing = False  # whether any layer recomputes its activations
    if hp.gradient_checkpointing:
        recomputed, total = enable_checkpointing(model, hp.checkpointed_layers)
        checkpointing = recomputed > 0 or total == 0
        if recomputed < total:
            speed = attrs.evolve(speed, notes=(*speed.notes, f"gradient checkpointing on "
                                                             f"{recomputed} of {total} decoder layers"))
    model.config.use_cache = False
    model.train()
    model = speed.prepare(model)
    if parallel is not None:
        model = parallel.wrap(model, speed)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, schedule or lr_lambda(total_steps, warmup_steps(cfg, total_steps),
                                         hp.lr_scheduler))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    graphs = None
    if graphs_wanted(cfg.environment.cuda_graphs, cuda=device.type == "cuda",
                     compiled=speed.compiled, varlen=speed.varlen, fused=speed.fused,
                     packing=cfg.data.packing, fp16=precision == "fp16",
                     checkpointing=checkpointing,
                     processes=1 if parallel is None else parallel.world):
        speed = attrs.evolve(speed, pad_to_multiple=TOKEN_MULTIPLE,
                             notes=(*speed.notes, "CUDA graphs for forward + backward"))
        graphs = UpdateGraphs(speed.loss, lambda: autocast(device, precision),
                              embedding_rows=speed.embedding_rows)
    setup = TrainingSetup(model, optimizer, scheduler, scaler, device, precision, speed,
                          parallel, graphs, adamw_step_of(optimizer, speed.triton_adamw))
    setup.engine = choose_engine(setup)
    return setup


def train_step(setup: TrainingSetup, batches: list[dict[str, Any]], n_trained: int,
               max_grad_norm: float | None, launched: Callable[[], None] | None = None
               ) -> tuple[float, float, float]:
    """One optimizer step over ``batches``; returns ``(loss, grad_norm, lr)``.

    ``launched()`` is called once the step's device work is queued, before the host waits
    for its result: host work given there (the next step's collation) overlaps the device.

    The loss of each micro-batch is a sum divided by the trained tokens of the whole step, so
    gradients accumulate to the token-weighted mean. A non-finite loss or gradient norm skips
    the update (the caller stops the run); fp16's scaler handles its own overflow steps.

    Under several processes (``setup.parallel``) ``batches`` are this rank's share,
    ``n_trained`` counts the whole global step, gradients are summed across ranks and the
    returned loss is the global one. A batch with ``loss_weight`` 0 only keeps the ranks'
    collectives in step (FSDP) and trains nothing.
    """
    return launch_step(setup, batches, n_trained, max_grad_norm, launched).result()


def launch_step(setup: TrainingSetup, batches: list[dict[str, Any]], n_trained: int,
                max_grad_norm: float | None, launched: Callable[[], None] | None = None
                ) -> LaunchedStep:
    """:func:`train_step`, returning as soon as the step no longer needs the host.

    A step that replays one whole-step CUDA graph is left running: its schedule step is taken
    at launch, so the caller may launch the next step before reading this one's result
    (``trainer run`` does, between checkpoints and evaluations; the GPU then never waits for
    the host between steps). Every other step runs to its end here.
    """
    return setup.engine.launch(batches, n_trained, max_grad_norm, launched)


def runs_ahead(setup: TrainingSetup, batches: list[dict[str, Any]]) -> bool:
    """Whether :func:`launch_step` will return with this step still running (a replay of a
    captured whole-step graph); callers read the step before it first when it will not, so
    an eager step's host work is not counted into the step before."""
    return setup.engine.runs_ahead(batches)
