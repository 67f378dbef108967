"""Several processes, one per GPU, through ``torchrun`` (PyTorch distributed; NCCL, or gloo on CPU).

``torchrun --nproc_per_node N -m trainer_core run ...`` (or ``trainer run --nproc N``, which
starts exactly that) runs the same recipe in N processes. :func:`distributed_session` turns the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``) into a
:class:`Distributed` for the recipe, or None in a single process, where nothing changes.

What the recipe gets from it:

* **The same step as one process.** The examples of optimizer step ``k`` are the plan's
  ``step_indices(k)`` whatever the world size; :func:`~trainer_core.data.batching.split_by_tokens`
  gives each rank a token-balanced share, which the rank packs into its own micro-batches. Each
  micro-batch's summed loss is divided by the trained tokens of the *whole* step (every rank
  computes that number from the same examples, no communication) and gradients are summed
  across ranks, so the update equals the single-process one.
* **ddp** (default): ``DistributedDataParallel`` over a small module whose forward is the
  trainer's loss (the loss runs the decoder and the output embedding directly, which a wrapper
  of the causal-LM forward would not see). Micro-batches but the last run under ``no_sync``; a
  rank may have more micro-batches than another. **fsdp**: FSDP2 ``fully_shard`` on every decoder
  layer and on that loss module (the root, holding embeddings, final norm and the tied head).
  Every FSDP forward all-gathers, so ranks run the same number of micro-batches: shorter shares
  get a weight-0 filler micro-batch. Mixed precision is the single-GPU one in both (bf16
  autocast over float32 master weights); the speed plan (varlen attention, compiled blocks,
  fused loss) runs inside the wrapped module unchanged.
* **Rank 0 alone writes**: status, metrics, previews, run.json, the config, checkpoints and the
  final model (the recipe builds listeners on rank 0 only). Rank 0 locates the output directory
  and takes its lock, then shares the result; it preprocesses first (building the cache) while
  the others wait, then they load the cache.
* **Checkpoints** keep the single-process format (safetensors weights, a full optimizer state
  keyed by parameter position): DDP ranks hold identical states, FSDP gathers them to rank 0.
  Any world size, and either strategy, resumes any checkpoint; the data position is global.
* **Failures**: a rank that raises marks the run failed in torchrun's store; a watchdog thread
  in every rank sees that, or a peer on this node that vanished (SIGKILL, OOM killer), within
  half a second, records ``failed`` (rank 0's status.json / run.json) and ends its process, so
  nobody waits for the NCCL timeout. Peers on other nodes are declared dead after
  :data:`PEER_DEAD_AFTER_S` without a heartbeat. SIGTERM/SIGINT are agreed across ranks at each
  step end, so all ranks stop after the same step and rank 0 checkpoints it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs

from trainer_core.config import TrainerConfig
from trainer_core.errors import UserError

#: A peer on another node with no heartbeat for this long is taken as dead (a checkpoint save
#: can hold the GIL for a while, so this is generous; peers on this node are checked by pid).
PEER_DEAD_AFTER_S = float(os.environ.get("TRAINER_PEER_DEAD_AFTER_S", "120"))
WATCH_INTERVAL_S = 0.5


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def torchrun_command(nproc: int, args: Sequence[str], *, python: str | None = None,
                     nnodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str | None = None, module: str = "trainer_core") -> list[str]:
    """The command that runs ``python -m MODULE ARGS`` in ``nproc`` processes per node.

    ``args`` are the trainer's arguments (e.g. ``["run", "--config", "c.json"]``). One node:
    ``--standalone`` (a local rendezvous on a free port). Several nodes: pass ``nnodes``, the
    same ``rdzv_endpoint`` (``host:port`` of one node) and ``rdzv_id`` on every node. The daemon
    launches its worker with this too (``module="trainer_core.daemon.worker"``).
    """
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ValueError("several nodes need rdzv_endpoint (host:port of one node)")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id or 'trainer'}"]
    cmd += [f"--nproc-per-node={nproc}", "-m", module, *args]
    return cmd


def main_first(dist: Distributed | None, fn: Callable[[], Any]) -> Any:
    """``fn()``; under several processes rank 0 runs it first, then the others (cache hits)."""
    return fn() if dist is None else dist.main_first(fn)


def share_from_main(dist: Distributed | None, fn: Callable[[], Any]) -> Any:
    """``fn()``; under several processes rank 0 alone runs it and every rank gets the result."""
    return fn() if dist is None else dist.share(fn)


def is_main(dist: Distributed | None) -> bool:
    """True in a single process and on rank 0: the process that writes the run's files."""
    return dist is None or dist.is_main


def resume_checkpoint(dist: Distributed | None, find: Callable[[], tuple[Any, list]]
                      ) -> tuple[Any, list]:
    """``find()`` -> ``(CheckpointData, accepted changes)`` (``checkpoint_to_resume``); under
    several processes rank 0 chooses and checks the checkpoint (its errors and notes are the
    job's) and the other ranks read the same one."""
    if dist is None:
        return find()
    mine: list[tuple[Any, list]] = []

    def choose() -> tuple[str, list]:
        mine.append(find())
        return str(mine[0][0].path), mine[0][1]

    path, accepted = dist.share(choose)
    if dist.is_main:
        return mine[0]
    from trainer_core.train.checkpoint import read_checkpoint

    return read_checkpoint(Path(path)), accepted


# --------------------------------------------------------------------------- the session


@contextlib.contextmanager
def distributed_session(cfg: TrainerConfig, dry_run: bool = False
                        ) -> Iterator[Distributed | None]:
    """A :class:`Distributed` for the run under torchrun (None otherwise), torn down after.

    An exception in this rank is published to the others before it propagates; a peer's
    failure ends this process through the watchdog.
    """
    if not launched_by_torchrun() or dry_run:
        yield None
        return
    dist = Distributed.start(cfg)
    try:
        yield dist
    except BaseException as exc:
        dist.mark_failed(exc)
        raise
    else:
        dist.finish()


@attrs.define(eq=False)
class Distributed:
    """One rank of a torchrun job: collectives, the wrapped model, checkpoint helpers."""

    rank: int
    world: int
    local_rank: int
    strategy: str  #: "ddp" or "fsdp"
    device: Any  #: where collectives' tensors live (cuda:LOCAL_RANK for NCCL, cpu for gloo)
    watchdog: Watchdog | None = None
    model: Any = None  #: the model (for fsdp: sharded in place)
    wrapped: Any = None  #: what runs a micro-batch's loss (DDP, or the FSDP root module)
    #: called (once, from any thread) with a one-line reason when the run dies of a failure
    on_abort: Callable[[str], None] | None = None
    _aborted: bool = False

    # ------------------------------------------------------------------ start and end

    @classmethod
    def start(cls, cfg: TrainerConfig) -> Distributed:
        import torch
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = cfg.environment.device
        cuda = torch.cuda.is_available() and want != "cpu"
        strategy = cfg.environment.distributed
        if strategy == "fsdp" and cfg.hyperparams.precision == "fp16":
            raise UserError("hyperparams.precision: fp16 is not supported with "
                            "environment.distributed=fsdp; use bf16")
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                                "CUDA devices: use --nproc-per-node <= the GPUs of this node")
            # "cuda" (what pick_device returns) now means this rank's GPU.
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {"timeout": timedelta(minutes=30)}
            if cuda:
                kwargs["device_id"] = device
            dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
        self = cls(rank, world, local_rank, strategy, device)
        self.watchdog = Watchdog.start(self)
        return self

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def finish(self) -> None:
        """Normal end (completed, interrupted or a handled failure): leave together."""
        import torch.distributed as dist

        if self.watchdog is not None:
            self.watchdog.mark_done()
        with contextlib.suppress(Exception):
            dist.barrier()
        if self.watchdog is not None:
            self.watchdog.stop()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    def mark_failed(self, exc: BaseException) -> None:
        """Tell the other ranks (through the store) that this one failed, and why."""
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            self.finish()
            return
        why = f"rank {self.rank}: {type(exc).__name__}: {exc}".splitlines()[0][:500]
        # This rank's own failure is recorded by the recipe (outcome_recorded); only tell peers.
        self.abort(why, publish=True, record=False)
        if self.watchdog is not None:
            self.watchdog.stop()

    def abort(self, why: str, publish: bool = False, record: bool = True) -> None:
        """Record the failure (``on_abort``: rank 0's files) once; optionally publish it to the
        peers."""
        if self._aborted:
            return
        self._aborted = True
        if publish and self.watchdog is not None:
            self.watchdog.publish_failure(why)
        if record and self.on_abort is not None:
            with contextlib.suppress(Exception):
                self.on_abort(why)

    def peer_failure(self, wait_s: float = 2.0) -> str | None:
        """Why a collective failed when another rank is to blame: the failure a peer published,
        or a peer on this node whose process is gone; None if neither shows within ``wait_s``
        (gloo can raise "connection reset" before the peer's exit is visible)."""
        if self.watchdog is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                why = self.watchdog.peer_failure()
            except Exception:  # the store is gone: torchrun is ending the job
                return None
            if why is not None or time.monotonic() >= deadline:
                return why
            time.sleep(0.05)

    # ------------------------------------------------------------------ collectives

    def all_sum(self, values: Sequence[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [float(x) for x in t.tolist()]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def share(self, fn: Callable[[], Any]) -> Any:
        """Rank 0 runs ``fn``; every rank gets its result. Rank 0's ``UserError`` reaches the
        others as a quiet exit 2 (rank 0 prints it)."""
        import torch.distributed as dist

        box: list[Any] = [None]
        error: UserError | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except UserError as exc:
                error = exc
                box[0] = ("error", str(exc))
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        kind, value = box[0]
        if kind == "error":
            raise SystemExit(2)
        return value

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """Rank 0 runs ``fn`` first (e.g. building a cache), then the others run it."""
        result: list[Any] = []

        def first() -> None:
            result.append(fn())

        self.share(first)
        return result[0] if self.is_main else fn()

    def step_consensus(self, batches: list[dict[str, Any]], signal_number: int | None
                       ) -> tuple[int, int | None]:
        """After a step: its processed tokens over all ranks, and whether any rank got a stop
        signal (one small all-reduce)."""
        import signal

        from trainer_core.data.batching import count_tokens

        mine = count_tokens([b for b in batches if b.get("loss_weight", 1.0)])
        tokens, stops = self.all_sum([float(mine), 1.0 if signal_number else 0.0])
        stop = (signal_number or int(signal.SIGTERM)) if stops else None
        return int(tokens), stop

    # ------------------------------------------------------------------ the model

    def wrap(self, model: Any, speed: Any) -> Any:
        """DDP or FSDP2 around ``model`` (prepared: compiled blocks etc.); returns the model
        whose parameters the optimizer must hold."""
        loss_module = _loss_module(model, speed)
        self.model = model
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # No buffer broadcast: it would be a collective in every forward (rotary tables
            # are the same everywhere anyway); grads as bucket views save one gradient copy.
            with warnings.catch_warnings():  # newer torch renames broadcast_buffers
                warnings.simplefilter("ignore", FutureWarning)
                self.wrapped = DistributedDataParallel(
                    loss_module, device_ids=ids, broadcast_buffers=False,
                    gradient_as_bucket_view=True)
            return model
        from torch.distributed.fsdp import fully_shard

        from trainer_core.model.loss import decoder_of

        for layer in getattr(decoder_of(model), "layers", []):
            fully_shard(layer)
        fully_shard(loss_module)
        self.wrapped = loss_module
        return model

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP average gradients over ranks; the step needs their sum."""
        return float(self.world)

    def loss(self, batch: dict[str, Any]) -> tuple[Any, int]:
        return self.wrapped(batch)

    def micro_batch(self, last: bool) -> Any:
        """DDP all-reduces only after the step's last micro-batch of this rank."""
        if self.strategy == "ddp" and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        import torch

        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def weights_finite(self) -> bool:
        """All ranks agree (FSDP: each checks its shard)."""
        import torch

        bad = 0.0
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if not bool(torch.isfinite(local).all()):
                bad = 1.0
                break
        return self.all_sum([bad])[0] == 0.0

    # ------------------------------------------------------------------ the data

    def step_share(self, examples: list[dict[str, Any]], cfg: TrainerConfig, budget: int,
                   pad_id: int, pad_to_multiple: int) -> tuple[list[dict[str, Any]], int]:
        """This rank's micro-batches of one global step, and the step's trained tokens."""
        from trainer_core.data.batching import count_micro_batches, micro_batches, trained_tokens

        if len(examples) < self.world:
            raise UserError(f"hyperparams: {len(examples)} examples per optimizer step cannot be "
                            f"split over {self.world} processes; raise batch_size x "
                            "gradient_accumulation to at least the number of processes")
        shares = self.shares(examples)
        mine = [examples[i] for i in shares[self.rank]]
        packing, batch_size = cfg.data.packing, cfg.hyperparams.batch_size
        batches = micro_batches(mine, packing, batch_size, budget, pad_id, pad_to_multiple)
        if self.strategy == "fsdp":
            most = max(count_micro_batches([len(examples[i]["input_ids"]) for i in s], packing,
                                           batch_size, budget) for s in shares)
            batches += self.fillers(mine, most - len(batches), packing, batch_size, budget,
                                    pad_id, pad_to_multiple)
        return batches, sum(trained_tokens(ex) for ex in examples)

    def shares(self, examples: list[dict[str, Any]]) -> list[list[int]]:
        from trainer_core.data.batching import split_by_tokens

        return split_by_tokens([len(ex["input_ids"]) for ex in examples], self.world)

    @staticmethod
    def fillers(mine: list[dict[str, Any]], n: int, packing: bool, batch_size: int,
                budget: int, pad_id: int, pad_to_multiple: int) -> list[dict[str, Any]]:
        """``n`` weight-0 micro-batches (the shortest own example): same collectives, no
        training. A trained token keeps every parameter in the backward pass."""
        from trainer_core.data.batching import micro_batches

        if n <= 0:
            return []
        shortest = min(mine, key=lambda ex: len(ex["input_ids"]))
        filler = micro_batches([shortest], packing, batch_size, budget, pad_id,
                               pad_to_multiple)[0]
        return [{**filler, "loss_weight": 0.0} for _ in range(n)]

    def evaluate(self, examples: list[dict[str, Any]], cfg: TrainerConfig, setup: Any,
                 pad_id: int, budget: int) -> float | None:
        """Validation loss with every rank scoring a share (FSDP needs all ranks anyway)."""
        import torch

        from trainer_core.model.loading import autocast
        from trainer_core.train.inputs import to_device

        if not examples:
            return None
        if len(examples) < self.world:
            examples = [examples[i % len(examples)] for i in range(self.world)]
            # (duplicates only when there are fewer examples than ranks; counted once below)
        share_batches, _ = self.step_share(examples, cfg, budget, pad_id,
                                           setup.speed.pad_to_multiple)
        total, count = 0.0, 0.0
        module = self.wrapped.module if self.strategy == "ddp" else self.wrapped
        module.eval()
        with torch.no_grad(), autocast(setup.device, setup.precision):
            for batch in share_batches:
                weight = float(batch.get("loss_weight", 1.0))
                loss, n = module(to_device(batch, setup.device))
                total += weight * float(loss)
                count += weight * n
        module.train()
        total, count = self.all_sum([total, count])
        return total / count if count else None

    # ------------------------------------------------------------------ checkpoints

    def full_model_state(self) -> dict[str, Any] | None:
        """FSDP: the full state dict on rank 0's CPU (a collective); DDP: None (use the model)."""
        if self.strategy != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
        if not self.is_main:
            return None
        # Tied weights appear under every name here; save_pretrained expects them once (the
        # first name, as a single process writes them).
        every = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        tied = every - {n for n, _ in self.model.named_parameters()}
        return {k: v for k, v in sd.items() if k not in tied}

    def save_checkpoint(self, output_dir: Path, step: int, setup: Any, state: dict[str, Any],
                        keep: int | None, facts: dict[str, Any] | None = None,
                        merged_from: Path | None = None) -> Path:
        """Rank 0 writes the single-process checkpoint format; all ranks return together, and
        all raise ``OSError`` when rank 0 could not write it (a full disk). ``merged_from``:
        as :func:`~trainer_core.train.checkpoint.save_checkpoint`'s."""
        from trainer_core.train.checkpoint import save_checkpoint

        model_state = optim_state = None
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            model_state = self.full_model_state()
            if setup.optimizer.state:
                full = get_optimizer_state_dict(
                    self.model, setup.optimizer,
                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                optim_state = positional_optimizer_state(full) if self.is_main else None
            else:
                # Before the first step (the daemon's step-0 checkpoint): the positional
                # format as is. get_optimizer_state_dict would initialise the state with a
                # zero-gradient step, so the first real step would be AdamW's second.
                optim_state = setup.optimizer.state_dict() if self.is_main else None
        path = output_dir / "checkpoints" / f"step-{step:06d}"
        error: OSError | None = None
        if self.is_main:
            try:
                path = save_checkpoint(output_dir, step, setup.model, setup.optimizer,
                                       setup.scheduler, setup.scaler,
                                       {**state, "world_size": self.world}, keep, facts,
                                       model_state=model_state, optimizer_state=optim_state,
                                       merged_from=merged_from)
            except OSError as exc:
                error = exc
        # Nobody moves on (or exits, on a signal) before the checkpoint is complete, and a
        # failed save stops every rank alike.
        failed = self.all_sum([1.0 if error is not None else 0.0])[0]
        if error is not None:
            raise error
        if failed:
            raise OSError(errno.EIO, "rank 0 could not write the checkpoint")
        return path

    def apply_checkpoint(self, data: Any, setup: Any) -> dict[str, Any]:
        """Restore a checkpoint every rank has read (``CheckpointData``, the single-process
        format, weights checked strictly): DDP loads it whole, FSDP takes its shards."""
        from trainer_core.train.checkpoint import (
            apply_checkpoint,
            check_weight_keys,
            set_rng_state,
        )

        if self.strategy == "ddp":
            return apply_checkpoint(data, setup.model, setup.optimizer, setup.scheduler,
                                    setup.scaler)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        check_weight_keys(data.path, data.weights, self.model)
        # strict=False: tied duplicates are not in the file (checked above instead)
        set_model_state_dict(self.model, dict(data.weights),
                             options=StateDictOptions(full_state_dict=True, strict=False))
        names = optimizer_param_names(self.model, setup.optimizer)
        try:
            set_optimizer_state_dict(self.model, setup.optimizer,
                                     named_optimizer_state(data.training["optimizer"], names),
                                     options=StateDictOptions(full_state_dict=True))
            setup.scheduler.load_state_dict(data.training["scheduler"])
        except (ValueError, KeyError, IndexError, RuntimeError) as exc:
            raise UserError(f"{data.path}: optimizer state does not fit this model: "
                            f"{exc}") from None
        set_rng_state(data.training["rng"])
        return data.state


# --------------------------------------------------------------------------- optimizer states


def optimizer_param_names(model: Any, optimizer: Any) -> list[str]:
    """Parameter names in the optimizer's order (the positions of ``optimizer.state_dict()``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def positional_optimizer_state(full: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed full optimizer state (``get_optimizer_state_dict``) in the positional
    format of ``optimizer.state_dict()``, which single-process runs save and load."""
    order = [n for g in full["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[n]: v for n, v in full["state"].items()}, "param_groups": groups}


def named_optimizer_state(positional: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`positional_optimizer_state` for this model's parameter names."""
    groups = [{**g, "params": [names[i] for i in g["params"]]}
              for g in positional["param_groups"]]
    return {"state": {names[int(i)]: v for i, v in positional["state"].items()},
            "param_groups": groups}


def _loss_module(model: Any, speed: Any) -> Any:
    """An ``nn.Module`` whose forward is the trainer's loss of one micro-batch."""
    import torch

    class TrainerLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: dict[str, Any]) -> tuple[Any, int]:
            return speed.loss(self.model, batch)

    return TrainerLoss()


# --------------------------------------------------------------------------- failure watchdog


class Watchdog:
    """A thread that ends this rank promptly when another rank failed or vanished.

    Collectives cannot be interrupted from Python (a rank blocked in NCCL never returns to the
    interpreter), so this thread watches torchrun's key-value store instead: ``failed`` (a rank
    raised), ``done/<rank>`` (a rank ended normally), ``hb/<rank>`` (heartbeats) and
    ``pid/<rank>`` (host and pid, checked directly for peers on this node).
    """

    def __init__(self, dist: Distributed, store: Any) -> None:
        self.dist = dist
        self.store = store
        self.stopped = threading.Event()
        self.host = socket.gethostname()
        self.thread = threading.Thread(target=self._loop, name="trainer-watchdog", daemon=True)

    @classmethod
    def start(cls, dist: Distributed) -> Watchdog | None:
        import torch.distributed as tdist

        try:
            base = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  is_master=False, timeout=timedelta(seconds=60))
        except (KeyError, RuntimeError, ValueError):  # no reachable store: no watchdog
            return None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        store = tdist.PrefixStore(f"trainer/{run_id}/{restart}/", base)
        self = cls(dist, store)
        store.set(f"pid/{dist.rank}", f"{self.host} {os.getpid()}")
        self.thread.start()
        return self

    def publish_failure(self, why: str) -> None:
        with contextlib.suppress(Exception):
            self.store.set("failed", why)

    def mark_done(self) -> None:
        with contextlib.suppress(Exception):
            self.store.set(f"done/{self.dist.rank}", "1")

    def stop(self) -> None:
        self.stopped.set()

    def peer_failure(self) -> str | None:
        """A failure a peer published, or a peer on this node that vanished (raises if the
        store is gone)."""
        if self.store.check(["failed"]):
            return f"another process of this run failed ({self.store.get('failed').decode()})"
        for r in range(self.dist.world):
            if r != self.dist.rank and not self.store.check([f"done/{r}"]) and self._gone(r):
                return f"rank {r} died (its process is gone)"
        return None

    def _loop(self) -> None:
        beat = 0
        seen: dict[int, tuple[str, float]] = {}
        peers = [r for r in range(self.dist.world) if r != self.dist.rank]
        while not self.stopped.wait(WATCH_INTERVAL_S):
            try:
                beat += 1
                self.store.set(f"hb/{self.dist.rank}", str(beat))
                why = self.peer_failure()
                if why is not None:
                    self._die(why)
                    return
                now = time.monotonic()
                for r in peers:
                    if self.store.check([f"done/{r}"]):
                        continue
                    hb = self.store.get(f"hb/{r}").decode() if self.store.check(
                        [f"hb/{r}"]) else ""
                    if r not in seen or seen[r][0] != hb:
                        seen[r] = (hb, now)
                    elif now - seen[r][1] > PEER_DEAD_AFTER_S:
                        self._die(f"rank {r} stopped responding for {PEER_DEAD_AFTER_S:.0f} s")
                        return
            except Exception:  # the store is gone: torchrun's agent is shutting the job down
                if self.stopped.is_set():
                    return
                self._die("lost contact with torchrun's store")
                return

    def _gone(self, rank: int) -> bool:
        key = f"pid/{rank}"
        if not self.store.check([key]):
            return False
        host, pid = self.store.get(key).decode().split()
        if host != self.host:
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _die(self, why: str) -> None:
        if self.stopped.is_set():
            return
        self.dist.abort(f"error: {why}; stopping")
        print(f"error: [rank {self.dist.rank}] {why}; stopping", file=sys.stderr, flush=True)
        os._exit(1)
