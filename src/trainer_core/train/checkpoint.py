"""Checkpoints: everything needed to continue a run exactly where it stopped, safe to load.

A checkpoint is a directory ``checkpoints/step-000123/`` holding:

* ``model.safetensors`` — the weights; for an adapter run (``model.adapter``) ``adapter/``
  instead, the adapter's weights and config only (:mod:`trainer_core.model.adapters`), so the
  checkpoint is small;
* ``training_state.pt`` — optimizer, scheduler and grad-scaler states and the RNG states, as
  plain tensors, numbers, strings, lists and dicts only, loaded with
  ``torch.load(weights_only=True)``: a crafted file cannot run code, it fails to load;
* ``run_facts.json`` — what shaped the run (profile, data and tokenizer hashes, the
  hyperparameters the optimizer and schedule baked in, world size), compared on resume by
  :func:`resume_differences`;
* ``trainer_state.json`` — step, token counters, metrics history, training segments. Written
  last, so its presence marks a complete checkpoint.

Everything is written into ``checkpoints/.tmp-step-N/`` and renamed into place; a crash or a
full disk mid-save leaves no half checkpoint that a resume would pick up, and the temporary
directory is removed (by the failing save, or by :func:`clean_partial` on the next run).

The daemon reuses :func:`list_checkpoints`, :func:`read_checkpoint`,
:func:`choose_checkpoint`, :func:`resume_differences` and :func:`check_resume`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from trainer_core.errors import UserError
from trainer_core.model import adapters

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
FACTS_FILE = "run_facts.json"
WEIGHTS_FILE = "model.safetensors"
TMP_PREFIX = ".tmp-"

#: Which ``output.allow_changes`` kind lets each recorded fact differ on resume.
FACT_KINDS: dict[str, str] = {
    "learning_rate": "lr",
    "weight_decay": "lr",
    "max_grad_norm": "lr",
    "lr_scheduler": "schedule",
    "warmup_steps": "schedule",
    "total_steps": "steps",
    "batch_size": "batch",
    "gradient_accumulation": "batch",
    "packing": "batch",
    "max_tokens_per_batch": "batch",
    "dataset_sha256": "data",
    "validation_sha256": "data",
    "validation_split": "data",
    "max_length": "data",
    "truncation": "data",
    "special_tokens_in_content": "data",
    "data_seed": "seed",
    "shuffle": "seed",
    "seed": "seed",
    "profile": "profile",
    "tokenizer": "tokenizer",
    "chat_template": "template",
    "adapter": "adapter",  # never accepted: an adapter of another shape is another run
}

#: Recorded for information only, never a difference that blocks a resume: checkpoints hold the
#: full (gathered) state and the global data position, so any number of processes resumes them.
INFORMATIONAL_FACTS = frozenset({"world_size"})


class UnreadableCheckpoint(UserError):
    """A checkpoint is incomplete or damaged (truncated file, bad JSON); an older one may do."""


class UnsafeCheckpoint(UserError):
    """A checkpoint holds content that only unpickling arbitrary objects could load."""


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (``trainer_state.json`` present), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def clean_partial(output_dir: Path) -> list[Path]:
    """Remove ``checkpoints/.tmp-*`` left by a process killed mid-save; returns what it removed.

    Only call it while holding the output directory's lock (no live save can be in flight).
    """
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    removed = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path:
    """``resume`` is ``latest`` (the newest complete checkpoint) or a checkpoint directory."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).exists():
            raise UserError(f"{path}: not a checkpoint directory (no {STATE_FILE})")
        return path
    found = list_checkpoints(output_dir)
    if not found:
        raise UserError(f"--resume: no checkpoint in {checkpoint_root(output_dir)}")
    return found[-1]


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors, numbers and lists only."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- saving


def save_checkpoint(output_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                    scaler: Any, state: dict[str, Any], keep: int | None,
                    facts: dict[str, Any] | None = None,
                    model_state: dict[str, Any] | None = None,
                    optimizer_state: dict[str, Any] | None = None,
                    rng: dict[str, Any] | None = None,
                    merged_from: Path | None = None) -> Path:
    """Write checkpoint ``step`` atomically (temp directory + rename) and prune old ones.

    On any failure (a full disk: ``OSError``) the temporary directory is removed and the
    exception propagates; earlier checkpoints are untouched. ``model_state`` /
    ``optimizer_state`` replace ``model.state_dict()`` / ``optimizer.state_dict()`` when given
    (a sharded model's gathered full state, in the same format, so any world size resumes it).
    ``merged_from`` (the base model directory): an adapter run's checkpoint also holds the
    merged model, an ordinary model directory (the daemon publishes it).
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"{TMP_PREFIX}step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_weights(model, tmp, model_state, merged_from)
        torch.save(
            {
                "optimizer": (optimizer_state if optimizer_state is not None
                              else optimizer.state_dict()),
                "scheduler": _plain_scheduler_state(scheduler),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng if rng is not None else rng_state(),
            },
            tmp / TRAINING_STATE,
        )
        if facts is not None:
            (tmp / FACTS_FILE).write_text(json.dumps(facts, indent=2, sort_keys=True),
                                          encoding="utf-8")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(output_dir, keep)
    return final


def save_weights(model: Any, dest: Path, model_state: dict[str, Any] | None = None,
                 merged_from: Path | None = None) -> None:
    """A checkpoint's weights: the model's (``model_state`` if given), or an adapter run's
    ``adapter/`` (and with ``merged_from`` the merged model beside it)."""
    if not adapters.is_adapter_model(model):
        model.save_pretrained(dest, safe_serialization=True, state_dict=model_state)
        return
    adapters.save_adapter(model, dest / adapters.ADAPTER_DIR, model_state)
    if merged_from is not None:
        adapters.write_merged(model, merged_from, dest)


def checkpoint_weights(model: Any) -> dict[str, Any]:
    """What a checkpoint saves of the model (live tensors): its state dict, or an adapter
    run's adapter tensors."""
    if adapters.is_adapter_model(model):
        return adapters.checkpoint_weights(model)
    return model.state_dict()


def to_host(tree: Any, _seen: dict[tuple[Any, ...], Any] | None = None) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU, detached from training.

    Tensors that were one tensor (tied embeddings) stay one copy, so saving still sees them
    as shared.
    """
    return HostSnapshot().copy(tree, _seen)


class HostSnapshot:
    """Host buffers for copies of state dicts, kept and refilled from one save to the next.

    A 0.6B model and its AdamW state are ~7 GB. Fresh host memory for every save cost the
    training loop seconds of page faults (an H100 run lost ~6 s after each of its first
    checkpoints, against ~0.4 s for a copy into memory it had already touched), so the buffers
    are allocated once, pinned where CUDA is used (the copy then runs at the bus's speed), and
    overwritten by the next save: torch's asynchronous checkpointing reuses its pinned staging
    memory the same way. A buffer is keyed by its place in the tree, shape and dtype, so a
    tree that changes shape simply gets new buffers.
    """

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def copy(self, tree: Any, _seen: dict[tuple[Any, ...], Any] | None = None,
             _path: tuple[Any, ...] = ()) -> Any:
        """``tree`` with each tensor copied into this snapshot's buffer for its place."""
        seen = {} if _seen is None else _seen
        if isinstance(tree, torch.Tensor):
            key = (tree.device, tree.data_ptr(), tuple(tree.shape), tree.stride(), tree.dtype)
            if key not in seen:
                seen[key] = self._buffer(_path, tree).copy_(tree.detach(), non_blocking=True)
            return seen[key]
        if isinstance(tree, dict):
            return {k: self.copy(v, seen, (*_path, k)) for k, v in tree.items()}
        if isinstance(tree, list | tuple):
            return type(tree)(self.copy(v, seen, (*_path, i)) for i, v in enumerate(tree))
        return tree

    def _buffer(self, path: tuple[Any, ...], like: torch.Tensor) -> torch.Tensor:
        key = (path, tuple(like.shape), like.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            pin = self.pin and like.is_cuda
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        return buf


class BackgroundCheckpoint:
    """Writes checkpoints in a thread while training goes on (``environment.async_checkpoint``).

    :meth:`start` copies the model and optimizer state to host memory first (the only part the
    training loop waits for), so later steps cannot change what is written; the files are then
    written and renamed into place exactly as :func:`save_checkpoint` does. The host copies go
    into a :class:`HostSnapshot` that every save reuses (pinned under CUDA): only the first save
    pays for new memory. One save at a time: starting another waits for the last.
    :meth:`finished` / :meth:`wait` return ``(step, path)`` once written and re-raise the
    thread's error (a full disk: ``OSError``) in the training thread.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._step = 0
        self._result: Path | None = None
        self._error: BaseException | None = None
        self._snapshot = HostSnapshot(pin=torch.cuda.is_available())

    @property
    def busy(self) -> bool:
        return self._thread is not None

    @property
    def step(self) -> int:
        """The step of the save in progress (or the last one)."""
        return self._step

    def start(self, output_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
              scaler: Any, state: dict[str, Any], keep: int | None,
              facts: dict[str, Any] | None = None) -> None:
        if self._thread is not None:
            raise RuntimeError("wait() for the previous checkpoint first")
        snap = self._snapshot
        model_state = snap.copy(checkpoint_weights(model), _path=("model",))
        optimizer_state = snap.copy(optimizer.state_dict(), _path=("optimizer",))
        # Everything else the save reads is copied now too: the loop changes it next step.
        scheduler_copy = _StateOnly(to_host(scheduler.state_dict()))
        scaler_copy = _StateOnly(to_host(scaler.state_dict())) if scaler is not None else None
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies into pinned buffers are asynchronous
        state = json.loads(json.dumps(state))
        rng = rng_state()

        def write() -> None:
            try:
                self._result = save_checkpoint(
                    output_dir, step, model, optimizer, scheduler_copy, scaler_copy, state, keep,
                    facts, model_state=model_state, optimizer_state=optimizer_state, rng=rng)
            except BaseException as exc:  # handed to the training thread
                self._error = exc

        self._step, self._result, self._error = step, None, None
        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=False)
        self._thread.start()

    def finished(self) -> tuple[int, Path] | None:
        """``(step, path)`` if a save just completed, else None; raises the save's error."""
        if self._thread is None or self._thread.is_alive():
            return None
        return self.wait()

    def wait(self) -> tuple[int, Path] | None:
        """Block until the save in progress (if any) is written; ``(step, path)`` or None."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        assert self._result is not None
        return self._step, self._result


class _StateOnly:
    """Stands in for a scheduler or scaler whose state was already copied."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _plain_scheduler_state(scheduler: Any) -> dict[str, Any]:
    # LambdaLR keeps callable objects' __dict__ here; ours are plain functions (stored as None),
    # rebuilt from the config on resume. Anything else would not load with weights_only.
    return scheduler.state_dict()


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- loading


@attrs.frozen
class CheckpointData:
    """A checkpoint read and checked, not yet applied to a model (see :func:`apply_checkpoint`)."""

    path: Path
    step: int
    weights: dict[str, Any]
    training: dict[str, Any]
    state: dict[str, Any]
    facts: dict[str, Any] | None  #: None for checkpoints older than run_facts.json
    #: ``weights`` are an adapter's (``adapter/``), not the whole model's
    adapter: bool = False


def read_checkpoint(path: Path) -> CheckpointData:
    """Read every file of a checkpoint, with no side effects.

    Raises :class:`UnsafeCheckpoint` when ``training_state.pt`` needs more than plain
    tensors and numbers to load (never unpickled), and :class:`UnreadableCheckpoint` when a
    file is missing, truncated or not valid.
    """
    from safetensors.torch import load_file

    path = Path(path)
    adapter_file = adapters.adapter_weights_file(path)
    weights_file = adapter_file or path / WEIGHTS_FILE
    for file in (weights_file, path / TRAINING_STATE, path / STATE_FILE):
        if not file.is_file():
            raise UnreadableCheckpoint(f"{path}: checkpoint has no {file.relative_to(path)}")
    try:
        training = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            first = str(exc).strip().splitlines()
            reason = next((ln for ln in first if "Unsupported" in ln or "GLOBAL" in ln),
                          first[0] if first else "")
            raise UnsafeCheckpoint(
                f"{path / TRAINING_STATE}: refused to load: it holds objects other than tensors "
                f"and numbers ({reason.strip()[:160]}); it was not written by trainer or was "
                "tampered with") from None
        raise UnreadableCheckpoint(f"{path / TRAINING_STATE}: unreadable: {exc}") from None
    except Exception as exc:  # truncated zip, I/O errors
        raise UnreadableCheckpoint(f"{path / TRAINING_STATE}: unreadable: "
                                   f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if not isinstance(training, dict) or not {"optimizer", "scheduler", "rng"} <= set(training):
        raise UnreadableCheckpoint(f"{path / TRAINING_STATE}: not a trainer training state")
    try:
        weights = load_file(weights_file)
    except Exception as exc:
        raise UnreadableCheckpoint(f"{weights_file}: unreadable: {exc}") from None
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        facts_file = path / FACTS_FILE
        facts = (json.loads(facts_file.read_text(encoding="utf-8"))
                 if facts_file.is_file() else None)
    except (OSError, ValueError) as exc:
        raise UnreadableCheckpoint(f"{path}: unreadable state: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UnreadableCheckpoint(f"{path / STATE_FILE}: no step recorded")
    return CheckpointData(path, state["step"], weights, training, state, facts,
                          adapter=adapter_file is not None)


def choose_checkpoint(output_dir: Path, explicit: Path | None = None,
                      warn: Callable[[str], None] | None = None) -> CheckpointData | None:
    """The checkpoint to resume from, read and checked: ``explicit``, or the newest complete
    one in ``output_dir`` that reads cleanly, falling back past damaged ones (each fallback is
    reported through ``warn``). ``None`` when ``output_dir`` holds no complete checkpoint.

    An unsafe checkpoint is never skipped silently: it raises :class:`UnsafeCheckpoint`.
    """
    if explicit is not None:
        return read_checkpoint(explicit)
    candidates = list_checkpoints(output_dir)
    for i, path in enumerate(reversed(candidates)):
        try:
            return read_checkpoint(path)
        except UnreadableCheckpoint as exc:
            older = candidates[-2 - i] if i + 1 < len(candidates) else None
            if warn is not None:
                warn(f"checkpoint {path.name} is unreadable ({exc}); "
                     + (f"falling back to {older.name}" if older is not None
                        else "no older checkpoint"))
            if older is None:
                raise
    return None


def apply_checkpoint(data: CheckpointData, model: Any, optimizer: Any, scheduler: Any,
                     scaler: Any) -> dict[str, Any]:
    """Load weights strictly (missing or extra tensors are an error listing them), optimizer,
    scheduler, scaler and RNG states; returns ``trainer_state.json``."""
    if data.adapter or adapters.is_adapter_model(model):
        if not data.adapter:
            raise UserError(f"{data.path} holds the full model's weights, but this run trains "
                            "an adapter; resume with the run's model.adapter")
        adapters.load_adapter_weights(model, data.weights, data.path / adapters.ADAPTER_DIR)
    else:
        check_weight_keys(data.path, data.weights, model)
        model.load_state_dict(data.weights, strict=False)  # tied duplicates are not in the file
    try:
        optimizer.load_state_dict(data.training["optimizer"])
        scheduler.load_state_dict(data.training["scheduler"])
        if scaler is not None and data.training.get("scaler") is not None:
            scaler.load_state_dict(data.training["scaler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{data.path}: optimizer state does not fit this model: {exc}") from None
    set_rng_state(data.training["rng"])
    return data.state


def check_weight_keys(path: Path, weights: dict[str, Any], model: Any) -> None:
    """Every parameter and buffer the model saves must be in ``weights`` and nothing else; a
    tensor tied to one present (input and output embeddings) counts as present."""
    own = model.state_dict()
    present_ptrs = {_storage_ptr(own[k]) for k in weights if k in own}
    missing = sorted(k for k, t in own.items() if k not in weights
                     and _storage_ptr(t) not in present_ptrs)
    unexpected = sorted(k for k in weights if k not in own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
        raise UserError(f"{path / WEIGHTS_FILE} does not match the model: {'; '.join(parts)}")
    for k, t in weights.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise UserError(f"{path / WEIGHTS_FILE}: tensor {k} has shape {tuple(t.shape)}, the "
                            f"model expects {tuple(own[k].shape)}")


def _storage_ptr(t: Any) -> int:
    # A sharded (FSDP2) parameter is a DTensor: tied weights share its local shard.
    return int((t.to_local() if hasattr(t, "to_local") else t).data_ptr())


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any
                    ) -> dict[str, Any]:
    """Read and restore checkpoint ``path`` into the given objects; returns its state."""
    return apply_checkpoint(read_checkpoint(path), model, optimizer, scheduler, scaler)


# --------------------------------------------------------------------------- resume checks


def resume_differences(old: dict[str, Any], new: dict[str, Any]
                       ) -> list[tuple[str, str, Any, Any]]:
    """Recorded facts that differ: ``(fact, kind, old, new)``; a fact missing on one side
    (an older checkpoint) is not a difference."""
    out: list[tuple[str, str, Any, Any]] = []
    for key in sorted(set(old) & set(new) - INFORMATIONAL_FACTS):
        if old[key] != new[key]:
            kind = FACT_KINDS.get(key, key)
            out.extend((name, kind, a, b) for name, a, b in _leaf_diffs(key, old[key], new[key]))
    return out


def _leaf_diffs(name: str, a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    # Nested facts (profile options) are compared leaf by leaf so the message names the option.
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                found.extend(_leaf_diffs(f"{name}.{k}", a.get(k), b.get(k)))
        return found
    return [(name, a, b)]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, str) and len(value) == 64:  # a sha256: the start is enough
        return value[:12]
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(old: dict[str, Any] | None, new: dict[str, Any],
                 allowed: Iterable[str] = ()) -> list[tuple[str, str, Any, Any]]:
    """Refuse to resume when facts differ from the checkpoint's, unless their kind is in
    ``allowed`` (``output.allow_changes``). Returns the accepted differences.

    The error lists each difference ``fact: old -> new`` and the ways out: accept them with
    ``--allow-changes KINDS`` (the new values are then really used) or start a fresh run.
    """
    if old is None:
        return []
    diffs = resume_differences(old, new)
    allowed = set(allowed)
    refused = [d for d in diffs if d[1] not in allowed]
    if refused:
        from trainer_core.config.sections import CHANGE_KINDS

        kinds = ",".join(sorted({d[1] for d in refused}))
        listed = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, _, a, b in refused)
        accept = (f"accept the changes with --allow-changes {kinds}, "
                  if set(kinds.split(",")) <= set(CHANGE_KINDS) else "")
        raise UserError(
            f"cannot resume: the run changed since the checkpoint ({listed}). Resume with the "
            f"original settings, {accept}or start a "
            "fresh run in another --output-dir from the checkpoint's weights (--model CHECKPOINT "
            "--tokenizer THE_MODEL)")
    return diffs


def apply_allowed_changes(diffs: list[tuple[str, str, Any, Any]], optimizer: Any,
                          scheduler: Any, new: dict[str, Any]) -> None:
    """Make accepted optimizer changes real: restored states carry the checkpoint's learning
    rate and weight decay, which would otherwise silently win over the new config."""
    changed = {d[0] for d in diffs}
    if "learning_rate" in changed:
        lr = new["learning_rate"]
        scheduler.base_lrs = [lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"] = lr
    if changed & {"learning_rate", "lr_scheduler", "warmup_steps", "total_steps"}:
        # The schedule function is rebuilt from the new config; the current lr must follow it.
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas, strict=True):
            group["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if "weight_decay" in changed:
        optimizer.param_groups[0]["weight_decay"] = new["weight_decay"]
    if "seed" in changed:
        torch.manual_seed(new["seed"])


def checkpoint_to_resume(output_dir: Path, explicit: Path | None, facts: dict[str, Any],
                         total_steps: int, allowed: Iterable[str],
                         note: Callable[[str], None]) -> tuple[CheckpointData, list]:
    """The checkpoint a resume continues from, read and checked against the run's ``facts``
    (see :func:`check_resume`), and the accepted differences. ``UserError`` when there is
    none, when it is past ``total_steps``, or when settings changed without being allowed."""
    data = choose_checkpoint(output_dir, explicit, note)
    if data is None:
        raise UserError(f"--resume: no checkpoint in {checkpoint_root(output_dir)}")
    if data.step > total_steps:
        raise UserError(f"{data.path.name} is at step {data.step} but this run has only "
                        f"{total_steps} steps; give --max-steps above {data.step} (or more "
                        "--epochs) to continue it")
    if data.facts is None:
        note(f"warning: {data.path} records no run facts (written by an older trainer); "
             "changed settings cannot be detected")
    was, now = (data.facts or {}).get("world_size"), facts.get("world_size")
    if was is not None and now is not None and was != now:
        note(f"resuming {data.path.name}, written by {was} process(es), in {now}: the same "
             "global steps, split over the new number of processes")
    return data, check_resume(data.facts, facts, allowed)
