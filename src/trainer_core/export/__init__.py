"""Layer 7, ``trainer export``: a run, checkpoint or model directory as a GGUF file or a clean
Hugging Face directory.

May import: generate, model, data, config, errors, files (never monitor, train or higher).

A run directory's final model (and each checkpoint) is already a faithful HF directory with
the training chat template (README "Output fidelity"); this package only reads it. Nothing
here loads remote code or unpickles anything: weights are read from safetensors files, the
configuration and tokenizer from their JSON files.

Every output is written under a temporary name next to its destination and renamed into
place at the end, so an error or an interruption leaves nothing written in part.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from trainer_core.errors import UserError

#: ``config.json`` architectures the exporter writes (the ones the project tests).
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "LlamaForCausalLM")
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


@attrs.frozen
class Source:
    """A model directory to export, read as plain files.

    ``config`` is its parsed ``config.json``; ``weight_files`` the safetensors files holding
    its weights (one file, or the shards an index names).
    """

    path: Path
    config: dict[str, Any]
    architecture: str
    weight_files: tuple[Path, ...]


def resolve_source(src: str) -> Source:
    """The model directory ``src`` names: a finished run, a checkpoint, or any HF directory.

    One-line errors for a run that never finished (no final model), a directory without
    ``config.json`` or safetensors weights, and an architecture the exporter does not write.
    """
    from trainer_core.generate.generate import run_directory

    path = Path(src).expanduser()
    if not path.is_dir():
        raise UserError(f"{src}: no such directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        if run_directory(path) == path:
            raise UserError(f"{src}: this run has no final model (it never finished); export "
                            f"one of its checkpoints ({_newest_checkpoint_hint(path)}) instead")
        if (path / "adapter_config.json").is_file():
            raise UserError(f"{src}: an adapter directory without a base model; export the run "
                            "directory, whose final model has the adapter merged")
        raise UserError(f"{src}: not a model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_path}: unreadable: {exc}") from None
    architecture = (config.get("architectures") or ["(none)"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{config_path}: architectures: {architecture} cannot be exported; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return Source(path, config, architecture, _weight_files(path))


def _newest_checkpoint_hint(run: Path) -> str:
    steps = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
    return str(steps[-1]) if steps else "it has none either"


def _weight_files(path: Path) -> tuple[Path, ...]:
    if (path / WEIGHTS_FILE).is_file():
        return (path / WEIGHTS_FILE,)
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise UserError(f"{index}: unreadable weight index: {exc}") from None
        files = tuple(path / name for name in sorted(set(weight_map.values())))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index}: weight_map names missing files: {', '.join(missing)}")
        return files
    # Pickled weights (pytorch_model.bin) are never loaded: a crafted file could run code.
    raise UserError(f"{path}: no {WEIGHTS_FILE} (only safetensors weights are exported)")


def iter_weights(source: Source) -> Iterator[tuple[str, Any]]:
    """``(name, float32 numpy array)`` for every tensor of the model, one at a time."""
    from safetensors import safe_open

    for file in source.weight_files:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, fh.get_tensor(name).float().numpy()


def weight_names(source: Source) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for file in source.weight_files:
        with safe_open(str(file), framework="pt") as fh:
            names += list(fh.keys())
    return names


def check_output(dest: Path, overwrite: bool, source: Path, directory: bool) -> None:
    """Refuse an existing output unless ``overwrite`` (and then only one of the same kind: a
    file for a file, a directory for a directory), an output inside the source or holding it,
    and a missing parent directory."""
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise UserError(f"-o {dest}: already exists (use --overwrite to replace it)")
        if dest.is_dir() != directory:
            raise UserError(f"-o {dest}: is a {'directory' if dest.is_dir() else 'file'}; "
                            f"--overwrite replaces a {'directory' if directory else 'file'} only")
    here, there = dest.resolve(), source.resolve()
    if here == there or there in here.parents or here in there.parents:
        raise UserError(f"-o {dest}: must be outside the directory being exported ({source})")
    if not dest.parent.is_dir():
        raise UserError(f"-o {dest}: directory {dest.parent} does not exist")


@contextmanager
def atomic_output(dest: Path) -> Iterator[Path]:
    """A temporary path next to ``dest``, renamed to ``dest`` when the block succeeds.

    On any error (or Ctrl-C) the temporary file or directory is removed and ``dest`` is left
    as it was. A directory being replaced is moved aside first and deleted only once the new
    one is in place. Callers check ``dest`` first (:func:`check_output`).
    """
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            _remove(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
