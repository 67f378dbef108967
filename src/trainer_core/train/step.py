"""One optimizer step, as ``trainer run`` and ``bench/throughput.py`` both take it.

:func:`prepare_training` builds the model, AdamW and the learning-rate schedule;
:func:`train_step` runs the micro-batches of one step and updates the weights.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from trainer_core.config import TrainerConfig
from trainer_core.model.fa4_warmup import warm_fa4_kernels
from trainer_core.model.graphs import TOKEN_MULTIPLE, StepGraphs, graphs_wanted
from trainer_core.model.loading import (
    autocast,
    check_model_locked,
    load_model,
    pick_device,
    pick_precision,
)
from trainer_core.model.speed import SpeedPlan, plan_speed
from trainer_core.model.tuning import tune_cpu_allocator, tune_cuda_allocator


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
    #: several processes: a :class:`trainer_core.train.distributed.Distributed`, else None
    parallel: Any = None
    #: CUDA graphs for forward + backward (:class:`trainer_core.model.graphs.StepGraphs`)
    graphs: Any = None
    #: takes the AdamW step of the device update: ``optimizer.step`` or the Triton kernel
    #: (:mod:`trainer_core.train.adamw`, ``environment.triton_adamw``)
    adamw_step: Callable[[], None] | None = None


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
    speed = plan_speed(cfg, device)
    if speed.attention_kernel == "fa4":
        warm_fa4_kernels(model_dir)  # overlaps the model load and the blocks' compilation
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
                     checkpointing=hp.gradient_checkpointing,
                     processes=1 if parallel is None else parallel.world):
        speed = attrs.evolve(speed, pad_to_multiple=TOKEN_MULTIPLE,
                             notes=(*speed.notes, "CUDA graphs for forward + backward"))
        graphs = StepGraphs(speed.loss, lambda: autocast(device, precision),
                            embedding_rows=speed.embedding_rows)
    return TrainingSetup(model, optimizer, scheduler, scaler, device, precision, speed, parallel,
                         graphs, adamw_step_of(optimizer, speed.triton_adamw))


def adamw_step_of(optimizer: Any, triton: bool) -> Callable[[], None]:
    """``optimizer.step``, or the one-kernel AdamW where ``triton`` asks for it and it can run."""
    # (a CUDA build of torch brings Triton along)
    if triton and optimizer.defaults.get("fused") and importlib.util.find_spec("triton"):
        from trainer_core.train.adamw import adamw_step, supported

        if supported(optimizer) and next(iter(optimizer.param_groups[0]["params"])).is_cuda:
            return functools.partial(adamw_step, optimizer)
    return optimizer.step


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


@attrs.define
class LaunchedStep:
    """A step whose work is queued (:func:`launch_step`); :meth:`result` waits for it."""

    #: the learning rate the step used
    lr: float
    #: blocks until the step's ``(loss, grad_norm)`` are on the host
    wait: Callable[[], tuple[float, float]]
    #: puts the LR schedule back if the step turns out not finite (it was stepped at launch)
    undo_schedule: Callable[[], None] | None = None
    #: the step is still running on the device (else :meth:`result` returns at once)
    running: bool = False

    def result(self) -> tuple[float, float, float]:
        """``(loss, grad_norm, lr)``, as :func:`train_step` returns them."""
        loss, grad_norm = self.wait()
        if self.undo_schedule is not None and not (math.isfinite(loss)
                                                   and math.isfinite(grad_norm)):
            self.undo_schedule()
        return loss, grad_norm, self.lr


def launch_step(setup: TrainingSetup, batches: list[dict[str, Any]], n_trained: int,
                max_grad_norm: float | None, launched: Callable[[], None] | None = None
                ) -> LaunchedStep:
    """:func:`train_step`, returning as soon as the step no longer needs the host.

    A step that replays one whole-step CUDA graph (:func:`whole_step_graph`) is left running:
    its schedule step is taken at launch, so the caller may launch the next step before
    reading this one's result (``trainer run`` does, between checkpoints and evaluations; the
    GPU then never waits for the host between steps). Every other step runs to its end here.
    """
    if whole_step_graph(setup, batches):
        return launch_graphed_step(setup, batches[0], n_trained, max_grad_norm, launched)
    loss, grad_norm, lr = step_to_the_end(setup, batches, n_trained, max_grad_norm, launched)
    return LaunchedStep(lr, lambda: (loss, grad_norm))


def step_to_the_end(setup: TrainingSetup, batches: list[dict[str, Any]], n_trained: int,
                    max_grad_norm: float | None, launched: Callable[[], None] | None = None
                    ) -> tuple[float, float, float]:
    """:func:`train_step` on every path but the whole-step graph."""
    import torch

    model, optimizer, scaler = setup.model, setup.optimizer, setup.scaler
    par, graphs = setup.parallel, setup.graphs
    # Summed on the device and read once per step (no host sync per micro-batch).
    total = torch.zeros((), dtype=torch.float64, device=setup.device)
    # With CUDA graphs, .grad still holds the last step's gradients (see the end): the step's
    # first graph replay overwrites them, an eager micro-batch zeroes them first.
    stale = graphs is not None and graphs.active
    for i, batch in enumerate(batches):
        if graphs is not None and graphs.accepts(batch):
            total += graphs.forward_backward(model, batch, 1.0 / max(n_trained, 1), stale)
            stale = False
            continue
        if stale:
            optimizer.zero_grad(set_to_none=False)
            stale = False
        weight = float(batch.get("loss_weight", 1.0))
        with par.micro_batch(last=i == len(batches) - 1) if par else contextlib.nullcontext():
            with autocast(setup.device, setup.precision):
                device_batch = to_device(batch, setup.device)
                loss, _ = (par.loss(device_batch) if par
                           else setup.speed.loss(model, device_batch))
                scaled = loss / max(n_trained, 1)
            grad_loss = scaled * (weight * par.loss_scale) if par else scaled
            (scaler.scale(grad_loss) if scaler else grad_loss).backward()
        total += weight * scaled.detach().float()
    lr = float(setup.scheduler.get_last_lr()[0])
    if update_on_device(setup):
        step_loss, grad_norm = guarded_update(optimizer, total, max_grad_norm, launched,
                                              setup.adamw_step)
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
    else:
        if launched is not None:
            launched()
        step_loss, grad_norm = loss_and_clip(setup, total, max_grad_norm)
        finite = math.isfinite(step_loss) and (scaler is not None or math.isfinite(grad_norm))
        if finite and scaler:
            scaler.step(optimizer)
            scaler.update()
            grad_norm = grad_norm if math.isfinite(grad_norm) else 0.0  # skipped by the scaler
        elif finite:
            optimizer.step()
    if finite:
        setup.scheduler.step()
    release_grads(setup)
    return step_loss, grad_norm, lr


def release_grads(setup: TrainingSetup) -> None:
    """The end of every step: ``.grad`` is freed, unless CUDA graphs need it where it is (it
    then stays, for the next step to overwrite or zero)."""
    if setup.graphs is None or not setup.graphs.active:
        setup.optimizer.zero_grad(set_to_none=True)


def whole_step_graph(setup: TrainingSetup, batches: list[dict[str, Any]]) -> bool:
    """Whether this step is one CUDA graph from forward to AdamW (``environment.graph_update``):
    a single micro-batch the graphs accept, with the update on the device."""
    return (setup.graphs is not None and setup.speed.graph_update and len(batches) == 1
            and update_on_device(setup) and setup.graphs.accepts(batches[0]))


def runs_ahead(setup: TrainingSetup, batches: list[dict[str, Any]]) -> bool:
    """Whether :func:`launch_step` will return with this step still running (a replay of a
    captured whole-step graph); callers read the step before it first when it will not, so
    an eager step's host work is not counted into the step before."""
    return whole_step_graph(setup, batches) and setup.graphs.will_replay(batches[0])


def launch_graphed_step(setup: TrainingSetup, batch: dict[str, Any], n_trained: int,
                        max_grad_norm: float | None, launched: Callable[[], None] | None = None
                        ) -> LaunchedStep:
    """:func:`launch_step` for a step :func:`whole_step_graph` accepts: the same update
    (:func:`queue_update`), recorded in the step's graph once its shape has been seen."""
    optimizer, scheduler = setup.optimizer, setup.scheduler
    lr = float(scheduler.get_last_lr()[0])
    wait, running = setup.graphs.update_step(
        setup.model, optimizer, batch, 1.0 / max(n_trained, 1),
        lambda total: queue_update(optimizer, total, max_grad_norm, step=setup.adamw_step),
        lambda total: guarded_update(optimizer, total, max_grad_norm, launched,
                                     setup.adamw_step), launched)
    # The next step's learning rate is needed before this one's loss is read: step the
    # schedule now and put it back if the step was not finite (train_step's promise).
    before = (scheduler.last_epoch, scheduler._step_count, list(scheduler._last_lr),
              [g["lr"] for g in optimizer.param_groups])
    scheduler.step()

    def undo() -> None:
        scheduler.last_epoch, scheduler._step_count, scheduler._last_lr, lrs = before
        for g, old in zip(optimizer.param_groups, lrs, strict=True):
            g["lr"] = old

    release_grads(setup)
    return LaunchedStep(lr, wait, undo, running)


def update_on_device(setup: TrainingSetup) -> bool:
    """Whether the step's clipping and update are queued before its loss is read
    (``environment.device_update``, see :func:`guarded_update`): one process, fused AdamW, no
    fp16 scaler."""
    return (setup.speed.device_update and setup.parallel is None and setup.scaler is None
            and bool(setup.optimizer.defaults.get("fused")))


def guarded_update(optimizer: Any, total: Any, max_grad_norm: float | None,
                   launched: Callable[[], None] | None = None,
                   step: Callable[[], None] | None = None) -> tuple[float, float]:
    """Clip and update on the device, then read the step's loss (``total``) and gradient norm.

    The update is queued before the host reads anything, so the host prepares it (~3 ms of
    Python for AdamW) while the GPU still runs the backward pass, and the next step's inputs
    while the GPU runs AdamW: the card no longer waits for the host between steps (measured
    idle on an H100 at 8 examples per step: 4.6 ms of a 57 ms step, before). A non-finite loss
    or norm must still change nothing: see :func:`queue_update`. ``launched()`` is called
    once AdamW is queued (see :func:`train_step`).
    """
    import torch

    host: list[Any] = []
    copied = torch.cuda.Event() if total.is_cuda else None  # (the CPU copies at once)

    def read_back(values: Any) -> None:
        host.append(values.to("cpu", non_blocking=True))  # pinned: copied before AdamW runs
        if copied is not None:
            copied.record()

    queue_update(optimizer, total, max_grad_norm, read_back, step)
    if launched is not None:
        launched()
    if copied is not None:
        copied.synchronize()
    loss, grad_norm = host[0].tolist()
    return loss, grad_norm


def queue_update(optimizer: Any, total: Any, max_grad_norm: float | None,
                 before_step: Callable[[Any], None] | None = None,
                 step: Callable[[], None] | None = None) -> Any:
    """Queue the norm, clipping and fused AdamW step on the device; returns the device tensor
    ``[loss, gradient norm]`` (float64) without reading it.

    Device work only, so a CUDA graph can record it (:meth:`StepGraphs.update_step`).
    A non-finite loss or norm changes nothing: fused AdamW skips the whole update on the device
    when ``found_inf`` is 1 (the hook GradScaler uses), the step counters included.
    ``before_step(values)`` runs before AdamW is queued (to copy the values out early);
    ``step()`` takes the AdamW step (default ``optimizer.step``; both read the same hooks).
    """
    import torch

    norm = clip_in_optimizer(optimizer, max_grad_norm)
    values = torch.stack([total.double(), norm.double()])
    optimizer.found_inf = (~torch.isfinite(values).all()).float()
    if before_step is not None:
        before_step(values)
    (step or optimizer.step)()
    return values


def loss_and_clip(setup: TrainingSetup, total: Any, max_grad_norm: float | None
                  ) -> tuple[float, float]:
    """The step's loss (``total``, a device scalar) and total gradient norm, read on the host,
    with the gradients clipped (unscaled first under fp16's scaler).

    The norm is computed either way: a non-finite one means a broken step.
    """
    import torch

    optimizer, par, scaler = setup.optimizer, setup.parallel, setup.scaler
    loss = par.all_sum([float(total)])[0] if par else float(total)
    if scaler:
        scaler.unscale_(optimizer)
    limit = max_grad_norm or float("inf")
    if par:
        return loss, par.clip_grad_norm(limit)
    return loss, float(torch.nn.utils.clip_grad_norm_(setup.model.parameters(), limit))


def clip_in_optimizer(optimizer: Any, max_norm: float | None) -> Any:
    """Total gradient norm (a device tensor); the clipping is left to fused AdamW.

    Fused AdamW divides each gradient by ``optimizer.grad_scale`` as it reads it (the hook
    GradScaler uses), so clipping costs no separate pass over the gradients: one read and one
    write of every float32 gradient less per step than ``clip_grad_norm_``. The divisor is
    ``max(1, norm / max_norm)``, the inverse of ``clip_grad_norm_``'s clamped coefficient.
    """
    import torch

    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    with torch.no_grad():
        # float32 whatever the gradients' dtype: fused AdamW takes a float32 divisor only, and
        # bfloat16 gradients (model.dtype=bfloat16) would round the norm to 3 digits.
        norm = torch.linalg.vector_norm(torch.stack(
            torch._foreach_norm(grads, 2, dtype=torch.float32)))
    optimizer.grad_scale = (None if not max_norm
                            else torch.clamp((norm + 1e-6) / max_norm, min=1.0))
    return norm


def token_budget(cfg: TrainerConfig) -> int:
    hp = cfg.hyperparams
    return cfg.data.max_tokens_per_batch or hp.batch_size * hp.max_length


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v)
            for k, v in batch.items()}
