"""A whole optimizer step of one micro-batch in one CUDA graph (``environment.graph_update``).

A step of one micro-batch (the default batch on a GPU) is captured whole: forward, backward,
gradient norm, clipping and the AdamW step (:func:`trainer_core.train.update.queue_update`) in
one graph, the update reading the gradients where the backward pass left them (no copy into
``.grad``) and the learning rate from a device tensor loaded before each replay. Such graphs
record the addresses of AdamW's state, so they are dropped when that state is replaced
(``load_state_dict``) or the optimizer changes.

:class:`UpdateGraphs` adds this to the forward + backward graphs of
:class:`trainer_core.model.graphs.StepGraphs` (same capture stream, memory pool and warm-up
rules); the update is training work, so it lives here rather than in the model layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainer_core.model.graphs import WARMUP, StepGraphs, _Captured, shape_key, static_inputs


class UpdateGraphs(StepGraphs):
    """:class:`~trainer_core.model.graphs.StepGraphs`, plus whole steps (:meth:`update_step`)."""

    def __init__(self, loss_fn: Callable[[Any, dict[str, Any]], tuple[Any, int]],
                 amp: Callable[[], Any], embedding_rows: bool = False) -> None:
        super().__init__(loss_fn, amp, embedding_rows)
        #: replays of whole steps (forward to AdamW, :meth:`update_step`), among ``replays``
        self.update_replays = 0
        #: what the update graphs recorded of the optimizer (see :meth:`update_step`)
        self._optimizer: Any = None
        self._hyper: Any = None

    def update_step(self, model: Any, optimizer: Any, batch: dict[str, Any], scale: float,
                    queue: Callable[[Any], Any], eager: Callable[[Any], tuple[float, float]],
                    launched: Callable[[], None] | None = None
                    ) -> tuple[Callable[[], tuple[float, float]], bool]:
        """A whole optimizer step of one micro-batch: forward, backward and the update.

        ``queue(scaled_loss) -> values`` queues the update on the device and returns the
        device tensor ``[loss, gradient norm]`` (no host read: a graph records it);
        ``eager(scaled_loss) -> (loss, norm)`` is the same update run eagerly, for a shape's
        first steps. Once captured, the update reads the gradients where the backward pass
        left them (no copy into ``.grad``) and the learning rate from a device tensor loaded
        before each replay. Returns ``(wait, running)``: ``wait() -> (loss, norm)`` blocks until
        the step is done, ``running`` says whether it was left running (a replay; the eager
        steps are finished). ``launched()`` is called once the work is queued. Replays may be
        queued before the last one is waited for: each has its own host buffer and event.
        """
        import torch

        host = static_inputs(batch, scale)
        groups = optimizer.param_groups
        host["lr"] = torch.tensor([g["lr"] for g in groups], dtype=torch.float32).pin_memory()
        key = (*shape_key(batch), "update")
        self._check_optimizer(optimizer)
        self._start()
        graph = self.graphs.get(key)
        if graph is None:
            ready = all(p in optimizer.state for g in groups for p in g["params"])
            if self.eager_runs < WARMUP or key not in self._seen or not ready:
                self._seen.add(key)
                # .grad exists once any graph does; before that the first backward creates it
                result = eager(self._eager(model, host, overwrite=self.active).double())
                return (lambda: result), False
            graph = self._capture_update(model, optimizer, host, queue)
            self.graphs[key] = graph
        graph.load(host)
        graph.graph.replay()
        self.replays += 1
        self.update_replays += 1
        values = torch.empty(2, dtype=torch.float64, pin_memory=True)
        values.copy_(graph.out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        if launched is not None:
            launched()

        def wait() -> tuple[float, float]:
            done.synchronize()
            loss, norm = values.tolist()
            return loss, norm

        return wait, True

    def will_replay(self, batch: dict[str, Any]) -> bool:
        """Whether :meth:`update_step` would replay a captured graph for ``batch`` (and so
        return with the step still running)."""
        return (*shape_key(batch), "update") in self.graphs

    def _check_optimizer(self, optimizer: Any) -> None:
        """Drop the update graphs if what they recorded of ``optimizer`` may have changed: its
        state tensors (``load_state_dict`` replaces them) or its fixed hyperparameters."""
        hyper = [(g["betas"], g["eps"], g["weight_decay"], g.get("amsgrad"), g.get("maximize"),
                  len(g["params"])) for g in optimizer.param_groups]
        if optimizer is self._optimizer and hyper == self._hyper:
            return
        self.drop_update_graphs()
        if optimizer is not self._optimizer:  # one hook per optimizer, not per change
            optimizer.register_load_state_dict_post_hook(
                lambda opt: self.drop_update_graphs() if opt is self._optimizer else None)
        self._optimizer, self._hyper = optimizer, hyper

    def drop_update_graphs(self) -> None:
        for key in [k for k in self.graphs if k[-1] == "update"]:
            del self.graphs[key]

    def _capture_update(self, model: Any, optimizer: Any, host: dict[str, Any],
                        queue: Callable[[Any], Any]) -> _Captured:
        import torch

        for g in optimizer.param_groups:  # .grad stays where it is (see the module doc)
            for p in g["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        static = {k: (torch.empty_like(v, device="cuda") if torch.is_tensor(v) else v)
                  for k, v in host.items()}
        out = torch.zeros(2, dtype=torch.float64, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            out.copy_(self.record_update(model, optimizer, static, queue))
        return _Captured(graph, static, out)

    def record_update(self, model: Any, optimizer: Any, static: dict[str, Any],
                      queue: Callable[[Any], Any]) -> Any:
        """What an update graph records: loss, gradients, then ``queue``, the optimizer's own
        step, reading the new gradients through ``.grad`` and each group's learning rate from
        ``static["lr"]`` (fused AdamW takes a device tensor when capturable, so the schedule
        changes it between replays). ``.grad``, the learning rates and ``capturable`` are put
        back afterwards. Runs eagerly too (the CPU test compares it with a plain step)."""
        groups = optimizer.param_groups
        params = [p for g in groups for p in g["params"]]
        kept = [p.grad for p in params]
        settings = [(g["lr"], g.get("capturable", False)) for g in groups]
        try:
            for i, g in enumerate(groups):
                g["lr"], g["capturable"] = static["lr"][i], True
            scaled, grads = self._loss_and_gradients(model, static, params)
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
            del grads
            return queue(scaled)
        finally:
            for p, grad in zip(params, kept, strict=True):
                p.grad = grad
            for g, (lr, capturable) in zip(groups, settings, strict=True):
                g["lr"], g["capturable"] = lr, capturable
            # in a capture these live in the graph's pool: no host-side reference may outlive it
            optimizer.grad_scale = optimizer.found_inf = None

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "whole_step_replays": self.update_replays}
