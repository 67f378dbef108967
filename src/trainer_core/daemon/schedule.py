"""The learning-rate schedule over a daemon's whole life (a multiplier of the peak LR).

The old daemon rebuilt ``trainer run``'s schedule for every file, so each file decayed the LR
toward zero and the next one warmed up again from nothing. Here the schedule is a function of
the *global* step: warmup runs once, over the first ``warmup`` steps the daemon ever takes,
then the LR stays at its peak (``constant``) however many files arrive. ``per_file`` (opt-in)
runs ``hyperparams.lr_scheduler`` over each file's own steps after that single warmup, back
at the peak for the next file.

:class:`DaemonSchedule` is a callable object, not a closure: ``LambdaLR.state_dict`` saves its
attributes with the checkpoint, so a resumed worker continues the same curve.
"""

from __future__ import annotations

import math


class DaemonSchedule:
    """LR multiplier at global step ``s`` (``torch.optim.lr_scheduler.LambdaLR``'s lambda)."""

    def __init__(self, warmup: int, kind: str = "constant", per_file: str = "cosine"):
        self.warmup = int(warmup)
        self.kind = kind
        self.per_file = per_file
        self.file_start = 0
        self.file_steps = 1

    def begin_file(self, start_step: int, file_steps: int) -> None:
        """Tell a ``per_file`` schedule where the file being trained starts and how long it is."""
        self.file_start = int(start_step)
        self.file_steps = max(1, int(file_steps))

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        # per_file: the position inside the current file (clamped: a warmup step is never here)
        progress = min(1.0, max(0.0, (step - self.file_start) / self.file_steps))
        if self.per_file == "constant":
            return 1.0
        if self.per_file == "linear":
            return max(0.0, 1.0 - progress)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(scheduler, optimizer) -> None:
    """Recompute the current LR of every group from the (changed) schedule at its step."""
    step = scheduler.last_epoch
    lrs = []
    for base, fn, group in zip(scheduler.base_lrs, scheduler.lr_lambdas, optimizer.param_groups,
                               strict=True):
        group["lr"] = base * fn(step)
        lrs.append(group["lr"])
    scheduler._last_lr = lrs


def apply_config_optimizer(cfg, scheduler, optimizer) -> None:
    """Put the config's learning rate and weight decay over a restored optimizer's: a
    checkpoint carries the values it was trained with, and a restart whose changes were
    accepted (``--allow-changes lr``) must really use the new ones. Unchanged values are
    left exactly as they were (same numbers)."""
    hp = cfg.hyperparams
    scheduler.base_lrs = [hp.learning_rate for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = hp.learning_rate
    optimizer.param_groups[0]["weight_decay"] = hp.weight_decay  # [1] is the no-decay group
