"""CUDA graphs for the forward and backward pass of one packed micro-batch.

At small batches (``trainer run``'s default of 8 examples, ~4k tokens per step) the GPU
finishes a step's ~1,900 kernels faster than Python and the dispatcher can launch them: the
card sat idle ~40% of each step (bench/throughput.py, ``trainer_profile``). A CUDA graph
records those launches once and replays them with one call.

A graph needs fixed shapes and fixed memory addresses, so a packed micro-batch is described
by a *shape key* and copied into static buffers:

* tokens ``T``: collation pads the packed row to a multiple of :data:`TOKEN_MULTIPLE` with a
  filler segment (its own positions, never trained);
* trained positions ``K``: the indices of trained tokens, padded to a multiple of
  :data:`TRAINED_MULTIPLE` with ignored targets (the fused loss gives them zero loss and
  gradient);
* segments ``M``: the cumulative example lengths, padded with empty segments to a multiple
  of :data:`SEGMENT_MULTIPLE`; the varlen attention's ``max_seqlen`` is the longest
  segment rounded up to a power of two (at least 1,024).

A key's first micro-batch runs eagerly (as do the first :data:`WARMUP`), so compilation,
recompilation for a new size range and autotuning all happen outside a capture; its second
is captured, and every later one replays the graph; all graphs share one memory
pool, which is safe because a replay leaves nothing alive in the pool (gradients accumulate
into ``.grad`` tensors allocated outside it, and the loss is copied out).

A graph either adds its gradients to ``.grad`` (a step's later micro-batches) or overwrites
``.grad`` with them (a step's first, ``overwrite=True``): then the previous step's gradients
need no zeroing pass, and no read of the old values before the add. Measured on an H100 at 8
examples per step, the zeroing and the adds were 4.3 ms of a 57 ms step. The two kinds are
captured separately (the mode is part of the key).

A step of one micro-batch can instead be captured whole, the AdamW update included: that is
training work, in :mod:`trainer_core.train.graph_update`, built on this class.

The rules that keep replays correct, for whoever drives these graphs (the CUDA engine,
:class:`trainer_core.train.engine.CudaEngine`): ``.grad`` tensors are created before the first
capture and never replaced or dropped (between steps they keep the last step's values); the
optimizer step, clipping and the LR schedule stay outside these graphs (so the learning rate
may change every step); nothing in the captured region reads a device value on the host. Off
(eager, as before) on CPU, under several processes, with fp16's loss scaler and with
gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainer_core.data.batching import IGNORE

#: Packed rows are padded to a multiple of this many tokens (a new graph per multiple).
TOKEN_MULTIPLE = 256
#: Trained positions per micro-batch are padded to a multiple of this (coarse: fewer shapes,
#: so fewer captures; the padding costs only lm_head work on ignored positions).
TRAINED_MULTIPLE = 1024
#: Segments (examples + filler) per micro-batch are padded to a multiple of this.
SEGMENT_MULTIPLE = 8
#: Eager micro-batches before the first capture (compile, autotune, lazy CUDA state).
WARMUP = 2
#: Larger micro-batches run eagerly: their kernels are long enough to hide the launches, and
#: their token counts rarely repeat, so each would be a new capture (measured: 64 examples
#: per step, ~35k tokens in one row, was 1.45x slower with graphs).
MAX_GRAPH_TOKENS = 16_384


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


class StepGraphs:
    """Runs ``loss(model, batch) * scale`` and its backward pass from captured CUDA graphs.

    ``loss_fn(model, batch) -> (summed loss, trained tokens)`` is the speed plan's loss; it
    must accept the static form of a batch (``cu_seqlens``, ``max_seqlen``,
    ``trained_index``, ``trained_targets``, ``n_trained``). ``amp()`` returns the autocast
    context of the forward pass.
    """

    def __init__(self, loss_fn: Callable[[Any, dict[str, Any]], tuple[Any, int]],
                 amp: Callable[[], Any], embedding_rows: bool = False) -> None:
        self.loss_fn = loss_fn
        self.amp = amp
        #: the input embedding's gradient by rows (:func:`loss_and_gradients`)
        self.embedding_rows = embedding_rows
        self.graphs: dict[tuple[int, int, int, int, Any], _Captured] = {}
        self.eager_runs = 0
        self.replays = 0
        self._seen: set[tuple[int, int, int, int, Any]] = set()
        self._pool: Any = None
        self._stream: Any = None

    @staticmethod
    def accepts(batch: dict[str, Any]) -> bool:
        """Packed single-row micro-batches of at most :data:`MAX_GRAPH_TOKENS` tokens, padded
        by collation to a multiple of :data:`TOKEN_MULTIPLE` (the speed plan asks for it)."""
        width = batch["input_ids"].shape[1]
        return ("seq_lens" in batch and batch.get("attention_mask") is None
                and batch["input_ids"].shape[0] == 1
                and width <= MAX_GRAPH_TOKENS and width % TOKEN_MULTIPLE == 0)

    @property
    def active(self) -> bool:
        """A graph exists: ``.grad`` tensors must stay where they are (never set to None)."""
        return bool(self.graphs)

    def forward_backward(self, model: Any, batch: dict[str, Any], scale: float,
                         overwrite: bool = False) -> Any:
        """Add the gradients of ``scale * loss`` to ``.grad`` (``overwrite``: replace ``.grad``
        with them); returns the scaled loss as a device scalar (read it before this method is
        called again)."""

        host = static_inputs(batch, scale)
        key = (*shape_key(batch), overwrite)
        self._start()
        graph = self.graphs.get(key)
        if graph is None:
            # A shape's first micro-batch runs eagerly: torch.compile may recompile for a new
            # size range, and compiling inside a capture fails. Its second one is captured.
            if self.eager_runs < WARMUP or key not in self._seen:
                self._seen.add(key)
                return self._eager(model, host, overwrite)
            graph = self._capture(model, host, overwrite)
            self.graphs[key] = graph
        graph.load(host)
        graph.graph.replay()
        self.replays += 1
        return graph.out

    def _start(self) -> None:
        """The capture stream and the memory pool all graphs share, made on first use."""
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream()
            self._pool = torch.cuda.graph_pool_handle()

    def _eager(self, model: Any, host: dict[str, Any], overwrite: bool) -> Any:
        """A warm-up micro-batch: the same code as the graph, run on the capture stream."""
        import torch

        main = torch.cuda.current_stream()
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            dev = {k: (v.to("cuda", non_blocking=True) if torch.is_tensor(v) else v)
                   for k, v in host.items()}
            scaled = self._forward_backward(model, dev, overwrite)
            out = scaled.detach().clone()
        main.wait_stream(self._stream)
        torch.cuda.synchronize()
        self.eager_runs += 1
        return out

    def _loss_and_gradients(self, model: Any, dev: dict[str, Any], params: list[Any]
                            ) -> tuple[Any, list[Any]]:
        return loss_and_gradients(lambda d: self._scaled_loss(model, d), model, dev, params,
                                  self.embedding_rows)

    def _forward_backward(self, model: Any, dev: dict[str, Any], overwrite: bool) -> Any:
        """The scaled loss, its gradients added to ``.grad``, or (``overwrite``) copied over it:
        the same code eagerly and in a capture, where the new gradients live in the graph pool
        only until copied, so nothing stays alive there."""
        import torch

        if not overwrite:
            scaled = self._scaled_loss(model, dev)
            scaled.backward()
            return scaled
        params = [p for p in model.parameters() if p.requires_grad]
        scaled, grads = self._loss_and_gradients(model, dev, params)
        torch._foreach_copy_([p.grad for p in params], grads)
        return scaled

    def _scaled_loss(self, model: Any, dev: dict[str, Any]) -> Any:
        with self.amp():
            loss, _ = self.loss_fn(model, dev)
            return loss * dev["scale"]

    def _capture(self, model: Any, host: dict[str, Any], overwrite: bool) -> _Captured:
        import torch

        for p in model.parameters():
            # Gradients must live outside the graph pool at fixed addresses (see module doc).
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        static = {k: (torch.empty_like(v, device="cuda") if torch.is_tensor(v) else v)
                  for k, v in host.items()}
        out = torch.zeros((), dtype=torch.float32, device="cuda")
        graph = torch.cuda.CUDAGraph()
        # Capturing records kernels without running them: the gradients are untouched.
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            scaled = self._forward_backward(model, static, overwrite)
            out.copy_(scaled.detach())
        return _Captured(graph, static, out)

    def stats(self) -> dict[str, int]:
        return {"graphs": len(self.graphs), "replays": self.replays, "eager": self.eager_runs}


def loss_and_gradients(scaled_loss: Callable[[dict[str, Any]], Any], model: Any,
                       dev: dict[str, Any], params: list[Any], embedding_rows: bool = True
                       ) -> tuple[Any, list[Any]]:
    """``scaled_loss(dev)`` and its gradients w.r.t. ``params`` (zeros where unused).

    ``embedding_rows``: the input embedding's gradient is added row by row. Autograd builds
    it as a dense vocabulary-sized matrix (zero-filled, this batch's rows written in) and, with
    tied embeddings, adds that to the output embedding's gradient: for Qwen3's 151,936 x 1,024
    float32 table, a 0.6 GB fill and a 1.9 GB add per step (~1 ms on an H100 at 8 examples per
    step, measured 0.63 ms for the add alone). Here the model gets the embeddings as
    ``inputs_embeds`` and their gradient comes back as ``tokens x hidden``, summed into the
    table's gradient at the batch's token ids. Only for a plain ``nn.Embedding`` (a
    ``padding_idx`` row gets no gradient, as in its own backward).
    """
    import torch
    import torch.nn.functional as F

    embed = _plain_embedding(model) if embedding_rows else None
    where = next((i for i, p in enumerate(params) if embed is not None and p is embed.weight),
                 None)
    if embed is None or where is None:
        scaled = scaled_loss(dev)
        return scaled, list(torch.autograd.grad(scaled, params, allow_unused=True,
                                                materialize_grads=True))
    ids = dev["input_ids"].reshape(-1)
    x = F.embedding(dev["input_ids"], embed.weight.detach()).requires_grad_()
    scaled = scaled_loss({**dev, "inputs_embeds": x})
    grads = list(torch.autograd.grad(scaled, [*params, x], allow_unused=True,
                                     materialize_grads=True))
    gx = grads.pop()
    rows = gx.reshape(-1, gx.shape[-1])
    if embed.padding_idx is not None:
        rows = rows.masked_fill((ids == embed.padding_idx).unsqueeze(1), 0.0)
    # index_put_ with accumulate sums repeated ids deterministically (sorted), unlike index_add_
    grads[where] = grads[where].index_put_((ids,), rows.to(grads[where].dtype), accumulate=True)
    return scaled, grads


def _plain_embedding(model: Any) -> Any:
    """The model's input embedding if it is a plain ``nn.Embedding`` (no max_norm, no scaling
    by frequency, dense), else None."""
    import torch

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if (type(embed) is not torch.nn.Embedding or embed.max_norm is not None
            or embed.scale_grad_by_freq or embed.sparse or not embed.weight.requires_grad):
        return None
    return embed


class _Captured:
    def __init__(self, graph: Any, static: dict[str, Any], out: Any) -> None:
        self.graph, self.static, self.out = graph, static, out

    def load(self, host: dict[str, Any]) -> None:
        for k, v in host.items():
            dst = self.static[k]
            if hasattr(dst, "copy_"):
                dst.copy_(v, non_blocking=True)


def static_inputs(batch: dict[str, Any], scale: float, pin: bool = True) -> dict[str, Any]:
    """The fixed-shape, pinned host form of a packed micro-batch (see the module doc), whose
    row collation already padded to a multiple of :data:`TOKEN_MULTIPLE`."""
    import numpy as np
    import torch

    ids, pos, targets = batch["input_ids"], batch["position_ids"], batch["targets"]
    lens = list(batch["seq_lens"])
    tgt = targets.reshape(-1).numpy()
    where = np.flatnonzero(tgt != IGNORE)
    width, k, bounds, max_seqlen = _sizes(ids.shape[1], lens, len(where))
    index = np.full(k, width - 1, dtype=np.int64)
    index[: len(where)] = where
    trained = np.full(k, IGNORE, dtype=np.int64)
    trained[: len(where)] = tgt[where]
    cu = np.full(bounds, width, dtype=np.int32)
    cu[: len(lens) + 1] = np.concatenate([[0], np.cumsum(lens)])
    pinned = {
        "input_ids": ids, "position_ids": pos,
        "cu_seqlens": torch.from_numpy(cu), "trained_index": torch.from_numpy(index),
        "trained_targets": torch.from_numpy(trained),
        "scale": torch.tensor(scale, dtype=torch.float32),
    }
    # Pinned host memory lets the copies into the graph's buffers run asynchronously.
    out: dict[str, Any] = ({k: v.pin_memory() for k, v in pinned.items()} if pin else pinned)
    out["max_seqlen"] = max_seqlen
    out["n_trained"] = int(len(where))
    return out


def shape_key(batch: dict[str, Any]) -> tuple[int, int, int, int]:
    """The shape of a packed micro-batch's fixed form (:func:`static_inputs`): tokens, trained
    positions, segment boundaries and ``max_seqlen``; a graph is captured per key."""
    return _sizes(batch["input_ids"].shape[1], list(batch["seq_lens"]),
                  int((batch["targets"] != IGNORE).sum()))


def _sizes(width: int, lens: list[int], n_trained: int) -> tuple[int, int, int, int]:
    """:func:`shape_key` from a row's width, its segment lengths and its trained positions
    (decided in one place: :func:`static_inputs` has already counted them)."""
    # The attention kernel's grid follows max_seqlen: the longest segment rounded up to a power
    # of two of at least 1,024 (few distinct values, so few extra graphs), not the whole row.
    max_seqlen = min(width, 1 << max(10, (max(lens) - 1).bit_length()))
    return (width, _round_up(n_trained, TRAINED_MULTIPLE),
            _round_up(len(lens), SEGMENT_MULTIPLE) + 1, max_seqlen)


def graphs_wanted(switch: str, *, cuda: bool, compiled: bool, varlen: bool, fused: bool,
                  packing: bool, fp16: bool, checkpointing: bool, processes: int) -> bool:
    """Whether ``environment.cuda_graphs`` turns graphs on for this run (auto: where they work)."""
    if switch == "off" or not cuda:
        return False
    works = varlen and fused and packing and not fp16 and not checkpointing and processes == 1
    if switch == "on":
        return works
    return works and compiled

