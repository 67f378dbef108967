"""The step engine: how one optimizer step runs, chosen once per run by ``prepare_training``.

Everything the loop may ask of the model and its optimizer goes through an engine:
:meth:`Engine.launch` (one step; returns a :class:`LaunchedStep`), :meth:`Engine.runs_ahead`,
:meth:`Engine.finite`, :meth:`Engine.save`, :meth:`Engine.load`, :meth:`Engine.evaluate` and
:meth:`Engine.full_model_state`. Three engines, picked by :func:`choose_engine`:

* :class:`Engine`, the plain one: per micro-batch forward, ``loss / trained tokens``,
  backward; then the loss and gradient norm read on the host, clipping, AdamW (fp16: through
  the loss scaler) and the schedule. The CPU runs this, and so does a GPU with the device
  update and CUDA graphs off.
* :class:`CudaEngine`: the same step with the GPU's pieces: micro-batches replayed from CUDA
  graphs (:mod:`trainer_core.model.graphs`), the clipping and update queued on the device
  before anything is read (:mod:`trainer_core.train.update`; Triton AdamW there), and a step
  of one micro-batch captured whole, left running so the next can be launched before it is
  read (:mod:`trainer_core.train.graph_update`). (A CPU test that switches
  ``environment.device_update`` on runs it too: that is how its update is tested without a GPU.)
* :class:`DistributedEngine`, several processes: the plain step with this rank's share of
  the micro-batches, the model's own collectives (DDP/FSDP), the loss summed and the norm
  clipped across ranks; checkpoints, finiteness and evaluation by all ranks together. CUDA
  graphs and the device update need one process, so it wraps only the plain step.

Compiled decoder blocks, the varlen attention and the fused loss are the model's and the
loss function's (the speed plan, :mod:`trainer_core.model.speed`): every engine runs them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from trainer_core.model.loading import autocast, weights_finite
from trainer_core.model.speed import SpeedPlan
from trainer_core.train.inputs import to_device
from trainer_core.train.update import guarded_update, queue_update


@attrs.define
class TrainingSetup:
    """Everything one optimizer step needs, built by
    :func:`~trainer_core.train.step.prepare_training`."""

    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any  # a GradScaler for fp16, else None
    device: Any
    precision: str
    speed: SpeedPlan
    #: several processes: a :class:`trainer_core.train.distributed.Distributed`, else None
    parallel: Any = None
    #: CUDA graphs for forward + backward and whole steps
    #: (:class:`trainer_core.train.graph_update.UpdateGraphs`), else None
    graphs: Any = None
    #: takes the AdamW step of the device update: ``optimizer.step`` or the Triton kernel
    #: (:mod:`trainer_core.train.adamw`, ``environment.triton_adamw``)
    adamw_step: Callable[[], None] | None = None
    #: how a step runs, chosen once (:func:`~trainer_core.train.engine.choose_engine`)
    engine: Engine = attrs.field(default=None)


@attrs.define
class LaunchedStep:
    """A step whose work is queued (:meth:`Engine.launch`); :meth:`result` waits for it."""

    #: the learning rate the step used
    lr: float
    #: blocks until the step's ``(loss, grad_norm)`` are on the host
    wait: Callable[[], tuple[float, float]]
    #: puts the LR schedule back if the step turns out not finite (it was stepped at launch)
    undo_schedule: Callable[[], None] | None = None
    #: the step is still running on the device (else :meth:`result` returns at once)
    running: bool = False

    def result(self) -> tuple[float, float, float]:
        """``(loss, grad_norm, lr)``, as :func:`trainer_core.train.step.train_step` returns them."""
        loss, grad_norm = self.wait()
        if self.undo_schedule is not None and not (math.isfinite(loss)
                                                   and math.isfinite(grad_norm)):
            self.undo_schedule()
        return loss, grad_norm, self.lr


def update_on_device(setup: TrainingSetup) -> bool:
    """Whether the step's clipping and update are queued before its loss is read
    (``environment.device_update``, see :func:`~trainer_core.train.update.guarded_update`):
    one process, fused AdamW, no fp16 scaler."""
    return (setup.speed.device_update and setup.parallel is None and setup.scaler is None
            and bool(setup.optimizer.defaults.get("fused")))


def choose_engine(setup: TrainingSetup) -> Engine:
    """The engine of a prepared setup: several processes, else the GPU's pieces where any is
    on, else the plain step."""
    if setup.parallel is not None:
        return DistributedEngine(setup)
    if setup.graphs is not None or update_on_device(setup):
        return CudaEngine(setup)
    return Engine(setup)


class Engine:
    """The plain step (see the module doc); the others change its parts, not its order."""

    def __init__(self, setup: TrainingSetup) -> None:
        self.setup = setup

    # ------------------------------------------------------------------ what the loop calls

    def launch(self, batches: list[dict[str, Any]], n_trained: int,
               max_grad_norm: float | None, launched: Callable[[], None] | None = None
               ) -> LaunchedStep:
        """One optimizer step over ``batches``, returned as soon as it no longer needs the
        host (see :func:`trainer_core.train.step.train_step` for the contract)."""
        loss, grad_norm, lr = self.step(batches, n_trained, max_grad_norm, launched)
        return LaunchedStep(lr, lambda: (loss, grad_norm))

    def runs_ahead(self, batches: list[dict[str, Any]]) -> bool:
        """Whether :meth:`launch` will return with this step still running."""
        return False

    def finite(self) -> bool:
        """Whether every weight is finite."""
        return weights_finite(self.setup.model)

    def save(self, output_dir: Path, step: int, state: dict[str, Any], keep: int | None,
             facts: dict[str, Any] | None = None, merged_from: Path | None = None) -> Path:
        """Write checkpoint ``step`` (weights, optimizer, schedule, RNG and ``state``);
        ``merged_from``: as :func:`~trainer_core.train.checkpoint.save_checkpoint`'s."""
        from trainer_core.train.checkpoint import save_checkpoint

        s = self.setup
        return save_checkpoint(output_dir, step, s.model, s.optimizer, s.scheduler, s.scaler,
                               state, keep, facts, merged_from=merged_from)

    def load(self, checkpoint: Any) -> dict[str, Any]:
        """Restore a read checkpoint (:class:`~trainer_core.train.checkpoint.CheckpointData`);
        returns its counters."""
        from trainer_core.train.checkpoint import apply_checkpoint

        s = self.setup
        return apply_checkpoint(checkpoint, s.model, s.optimizer, s.scheduler, s.scaler)

    def evaluate(self, examples: Any, cfg: Any, pad_id: int, budget: int) -> float | None:
        """Validation loss over ``examples``."""
        from trainer_core.train.evaluate import evaluate

        s = self.setup
        return evaluate(s.model, examples, cfg, s.device, s.precision, pad_id, s.speed)

    def full_model_state(self) -> dict[str, Any] | None:
        """The state dict a final save needs in place of the model's own (None: the model's)."""
        return None

    # ------------------------------------------------------------------ the step's parts

    def step(self, batches: list[dict[str, Any]], n_trained: int,
             max_grad_norm: float | None, launched: Callable[[], None] | None
             ) -> tuple[float, float, float]:
        """Forward and backward of every micro-batch, the update, the schedule; the step is
        done when this returns. A non-finite step updates nothing and leaves the schedule."""
        s = self.setup
        total = self.forward_backward(batches, n_trained)
        lr = float(s.scheduler.get_last_lr()[0])
        step_loss, grad_norm, finite = self.update(total, max_grad_norm, launched)
        if finite:
            s.scheduler.step()
        self.release_grads()
        return step_loss, grad_norm, lr

    def forward_backward(self, batches: list[dict[str, Any]], n_trained: int) -> Any:
        """Gradients of every micro-batch accumulated in ``.grad``; returns the step's loss as
        a device scalar, summed on the device and read once per step (no host sync per
        micro-batch)."""
        import torch

        total = torch.zeros((), dtype=torch.float64, device=self.setup.device)
        for i, batch in enumerate(batches):
            total += self.micro_batch(batch, n_trained, last=i == len(batches) - 1)
        return total

    def micro_batch(self, batch: dict[str, Any], n_trained: int, last: bool) -> Any:
        """One eager micro-batch: its summed loss divided by the whole step's trained tokens
        (so gradients accumulate to the token-weighted mean), then backward; returns its part
        of the step's loss."""
        s = self.setup
        weight = float(batch.get("loss_weight", 1.0))
        with self.micro_batch_context(last):
            with autocast(s.device, s.precision):
                device_batch = to_device(batch, s.device)
                loss, _ = self.loss(device_batch)
                scaled = loss / max(n_trained, 1)
            grad_loss = self.grad_loss(scaled, weight)
            (s.scaler.scale(grad_loss) if s.scaler else grad_loss).backward()
        return weight * scaled.detach().float()

    def micro_batch_context(self, last: bool) -> Any:
        return contextlib.nullcontext()

    def loss(self, device_batch: dict[str, Any]) -> tuple[Any, int]:
        return self.setup.speed.loss(self.setup.model, device_batch)

    def grad_loss(self, scaled: Any, weight: float) -> Any:
        return scaled

    def update(self, total: Any, max_grad_norm: float | None,
               launched: Callable[[], None] | None) -> tuple[float, float, bool]:
        """Read the loss and norm, clip, and take the AdamW step if the step is finite;
        returns ``(loss, grad_norm, finite)``. fp16's scaler handles its own overflow steps."""
        s = self.setup
        if launched is not None:
            launched()
        step_loss, grad_norm = self.loss_and_clip(total, max_grad_norm)
        finite = math.isfinite(step_loss) and (s.scaler is not None or math.isfinite(grad_norm))
        if finite and s.scaler:
            s.scaler.step(s.optimizer)
            s.scaler.update()
            grad_norm = grad_norm if math.isfinite(grad_norm) else 0.0  # skipped by the scaler
        elif finite:
            s.optimizer.step()
        return step_loss, grad_norm, finite

    def loss_and_clip(self, total: Any, max_grad_norm: float | None) -> tuple[float, float]:
        """The step's loss (``total``, a device scalar) and total gradient norm, read on the
        host, with the gradients clipped (unscaled first under fp16's scaler).

        The norm is computed either way: a non-finite one means a broken step.
        """
        s = self.setup
        loss = self.read_loss(total)
        if s.scaler:
            s.scaler.unscale_(s.optimizer)
        return loss, self.clip(max_grad_norm or float("inf"))

    def read_loss(self, total: Any) -> float:
        return float(total)

    def clip(self, limit: float) -> float:
        import torch

        return float(torch.nn.utils.clip_grad_norm_(self.setup.model.parameters(), limit))

    def release_grads(self) -> None:
        """The end of every step: ``.grad`` is freed."""
        self.setup.optimizer.zero_grad(set_to_none=True)


class CudaEngine(Engine):
    """The plain step with the GPU's pieces (see the module doc): graphs where they accept a
    micro-batch, the update on the device, whole-step graphs that run ahead."""

    def __init__(self, setup: TrainingSetup) -> None:
        super().__init__(setup)
        #: :class:`~trainer_core.train.graph_update.UpdateGraphs`, or None (graphs off)
        self.graphs = setup.graphs

    def launch(self, batches: list[dict[str, Any]], n_trained: int,
               max_grad_norm: float | None, launched: Callable[[], None] | None = None
               ) -> LaunchedStep:
        """A step that replays one whole-step CUDA graph (:meth:`whole_step`) is left
        running: its schedule step is taken at launch, so the caller may launch the next step
        before reading this one's result (the GPU then never waits for the host between
        steps). Every other step runs to its end here."""
        if self.whole_step(batches):
            return self.launch_graphed(batches[0], n_trained, max_grad_norm, launched)
        return super().launch(batches, n_trained, max_grad_norm, launched)

    def runs_ahead(self, batches: list[dict[str, Any]]) -> bool:
        """A replay of a captured whole-step graph; callers read the step before it first when
        it will not, so an eager step's host work is not counted into the step before."""
        return self.whole_step(batches) and self.graphs.will_replay(batches[0])

    def whole_step(self, batches: list[dict[str, Any]]) -> bool:
        """Whether this step is one CUDA graph from forward to AdamW (``environment.
        graph_update``): a single micro-batch the graphs accept, with the update on the device."""
        return (self.graphs is not None and self.setup.speed.graph_update and len(batches) == 1
                and update_on_device(self.setup) and self.graphs.accepts(batches[0]))

    def launch_graphed(self, batch: dict[str, Any], n_trained: int,
                       max_grad_norm: float | None, launched: Callable[[], None] | None = None
                       ) -> LaunchedStep:
        """:meth:`launch` for a step :meth:`whole_step` accepts: the same update
        (:func:`~trainer_core.train.update.queue_update`), recorded in the step's graph once
        its shape has been seen."""
        setup = self.setup
        optimizer, scheduler = setup.optimizer, setup.scheduler
        lr = float(scheduler.get_last_lr()[0])
        wait, running = self.graphs.update_step(
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

        self.release_grads()
        return LaunchedStep(lr, wait, undo, running)

    def forward_backward(self, batches: list[dict[str, Any]], n_trained: int) -> Any:
        """As the plain step, with each micro-batch the graphs accept replayed from its graph.

        With CUDA graphs, ``.grad`` still holds the last step's gradients (see
        :meth:`release_grads`): the step's first graph replay overwrites them, an eager
        micro-batch zeroes them first."""
        import torch

        graphs, optimizer = self.graphs, self.setup.optimizer
        total = torch.zeros((), dtype=torch.float64, device=self.setup.device)
        stale = graphs is not None and graphs.active
        for i, batch in enumerate(batches):
            if graphs is not None and graphs.accepts(batch):
                total += graphs.forward_backward(self.setup.model, batch,
                                                 1.0 / max(n_trained, 1), stale)
                stale = False
                continue
            if stale:
                optimizer.zero_grad(set_to_none=False)
                stale = False
            total += self.micro_batch(batch, n_trained, last=i == len(batches) - 1)
        return total

    def update(self, total: Any, max_grad_norm: float | None,
               launched: Callable[[], None] | None) -> tuple[float, float, bool]:
        """Clip and update on the device before the loss is read (``environment.
        device_update``), else as the plain step."""
        if not update_on_device(self.setup):
            return super().update(total, max_grad_norm, launched)
        s = self.setup
        step_loss, grad_norm = guarded_update(s.optimizer, total, max_grad_norm, launched,
                                              s.adamw_step)
        return step_loss, grad_norm, math.isfinite(step_loss) and math.isfinite(grad_norm)

    def release_grads(self) -> None:
        """``.grad`` is freed, unless CUDA graphs need it where it is (it then stays, for the
        next step to overwrite or zero)."""
        if self.graphs is None or not self.graphs.active:
            super().release_grads()


class DistributedEngine(Engine):
    """The plain step under several processes (``setup.parallel``, a
    :class:`~trainer_core.train.distributed.Distributed`).

    ``batches`` are this rank's share, ``n_trained`` counts the whole global step, gradients
    are summed across ranks and the returned loss is the global one. A batch with
    ``loss_weight`` 0 only keeps the ranks' collectives in step (FSDP) and trains nothing.
    """

    def __init__(self, setup: TrainingSetup) -> None:
        super().__init__(setup)
        self.par = setup.parallel

    def micro_batch_context(self, last: bool) -> Any:
        return self.par.micro_batch(last=last)

    def loss(self, device_batch: dict[str, Any]) -> tuple[Any, int]:
        return self.par.loss(device_batch)

    def grad_loss(self, scaled: Any, weight: float) -> Any:
        return scaled * (weight * self.par.loss_scale)

    def read_loss(self, total: Any) -> float:
        return self.par.all_sum([float(total)])[0]

    def clip(self, limit: float) -> float:
        return self.par.clip_grad_norm(limit)

    def finite(self) -> bool:
        """All ranks agree."""
        return self.par.weights_finite()

    def save(self, output_dir: Path, step: int, state: dict[str, Any], keep: int | None,
             facts: dict[str, Any] | None = None, merged_from: Path | None = None) -> Path:
        """Rank 0 writes; FSDP gathers the full state first; all ranks return together."""
        return self.par.save_checkpoint(output_dir, step, self.setup, state, keep, facts,
                                        merged_from=merged_from)

    def load(self, checkpoint: Any) -> dict[str, Any]:
        """Every rank takes its part (FSDP: its shards) of the full state."""
        return self.par.apply_checkpoint(checkpoint, self.setup)

    def evaluate(self, examples: Any, cfg: Any, pad_id: int, budget: int) -> float | None:
        """Every rank scores a share."""
        return self.par.evaluate(examples, cfg, self.setup, pad_id, budget)

    def full_model_state(self) -> dict[str, Any] | None:
        """The full state, gathered by every rank (FSDP); rank 0 writes it."""
        return self.par.full_model_state()
