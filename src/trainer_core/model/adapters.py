"""Low-rank adapters (LoRA, DoRA, QLoRA) through ``peft``: an engine concern, hooked in at a
few named places rather than a branch in the training loop.

With ``model.adapter: lora`` the base model is loaded as usual and frozen, and every targeted
linear layer gets a trainable ``B @ A`` of rank ``adapter.rank`` (peft's ``LoraModel``; DoRA
with ``adapter.use_dora``). ``qlora`` loads the base in 4-bit NF4 through transformers'
``BitsAndBytesConfig`` (CUDA only). The rest of the engine sees an ordinary module: the loss
runs the (adapted) decoder and the frozen output embedding, AdamW gets only the parameters
that require gradients, DDP synchronises only those.

Where the engine calls in:

* :func:`load_kwargs` (``model.loading.load_model``): the base's dtype and quantization;
* :func:`with_speed_switches` and :func:`wrap` (``train.step.prepare_training``): the speed
  piece that does not pay with adapters (CUDA graphs) is switched off with one printed line;
  the loaded model is wrapped before compilation and DDP;
* :func:`checkpoint_weights`, :func:`save_adapter`, :func:`load_adapter_weights`
  (``train.checkpoint``): checkpoints hold ``adapter/`` (the adapter's weights and
  ``adapter_config.json``, what ``peft.PeftModel.from_pretrained`` loads) plus optimizer,
  schedule and RNG: small;
* :func:`save_final` (``train.recipe.save_final_model``) and :func:`write_merged` (the
  daemon's published models): the merged model as an ordinary Hugging Face directory, built
  from copies, so the base weights in memory stay bit-identical;
* :func:`adapter_facts` (the resume facts) and :func:`adapter_plan` (``--dry-run``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

from trainer_core.config import TrainerConfig
from trainer_core.errors import UserError

#: The adapter's folder in a final model directory and in a checkpoint.
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: peft's name for the (only) adapter.
ADAPTER_NAME = "default"


def enabled(cfg: TrainerConfig) -> bool:
    return cfg.model.adapter != "none"


def require_peft(cfg: TrainerConfig) -> None:
    """A one-line error when the ``lora`` extra is missing."""
    if importlib.util.find_spec("peft") is None:
        raise UserError(f"model.adapter: {cfg.model.adapter} needs the peft package, which is "
                        "not installed: pip install 'trainer-core[lora]'")


def check_device(cfg: TrainerConfig, device: Any) -> None:
    """QLoRA's 4-bit base needs bitsandbytes on a CUDA device."""
    if cfg.model.adapter != "qlora":
        return
    if getattr(device, "type", str(device)) != "cuda":
        raise UserError("model.adapter: qlora quantizes the base model to 4-bit with "
                        "bitsandbytes, which needs a CUDA GPU; use model.adapter: lora here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("model.adapter: qlora needs the bitsandbytes package, which is not "
                        "installed: pip install 'trainer-core[qlora]'")


# --------------------------------------------------------------------------- loading


def load_kwargs(cfg: TrainerConfig, device: Any) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for an adapter run (none without an adapter).

    The frozen base is kept in the compute dtype when ``model.dtype`` is ``auto`` and the run
    computes in bf16: it is never updated, so float32 master copies would only double its
    memory. ``qlora``: 4-bit NF4 with double quantization (the QLoRA paper's settings),
    computing in the run's precision, loaded straight onto the device.
    """
    if not enabled(cfg):
        return {}
    require_peft(cfg)
    check_device(cfg, device)
    import torch

    from trainer_core.model.loading import pick_precision

    precision = pick_precision(cfg, device)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    out: dict[str, Any] = {"dtype": base_dtype(cfg, device)}
    if cfg.model.adapter == "qlora":
        from transformers import BitsAndBytesConfig

        out["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        index = device.index if device.index is not None else torch.cuda.current_device()
        out["device_map"] = {"": index}  # quantized as loaded; such a model cannot be .to()'d
    return out


def with_speed_switches(cfg: TrainerConfig, device: Any, note: Any = None,
                        keep: Collection[str] = ()) -> TrainerConfig:
    """The config with the GPU speed pieces that do not pay with adapters off.

    Measured on an H100 with the Qwen3-8B shape (bench/adapters.py, docs/throughput.md): varlen
    attention, compiled decoder blocks (LoRA and QLoRA: bitsandbytes' 4-bit matmul runs inside
    them, 1.7x eager QLoRA), the fused loss (it skips the frozen output embedding's gradient)
    and the Triton AdamW work with adapters. Off, with one printed line: CUDA graphs (and the
    whole-step graph, the on-device update inside it and the embedding-row gradient that ride
    on them): with LoRA they replayed correctly but were 5% slower, and with QLoRA they are
    unmeasured. ``keep`` names pieces to leave on anyway (``"graphs"``): bench/adapters.py
    measures them so.
    """
    if not enabled(cfg) or getattr(device, "type", str(device)) != "cuda":
        return cfg
    import attrs

    env = cfg.environment
    if env.cuda_graphs == "off" or "graphs" in keep:
        return cfg
    (note or _stderr)(f"adapters: CUDA graphs off for {cfg.model.adapter} (measured no faster "
                      "with LoRA; environment.cuda_graphs)")
    return attrs.evolve(cfg, environment=attrs.evolve(
        env, cuda_graphs="off", graph_update="off", embedding_grad_rows="off"))


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- wrapping


def _linear_types() -> tuple[type, ...]:
    import torch

    return (torch.nn.Linear,)  # bitsandbytes' Linear4bit subclasses it


def default_targets(model: Any) -> str:
    """peft ``target_modules`` (a regex over module names) for every linear layer of the
    decoder blocks: the attention and MLP projections, never the lm_head."""
    from trainer_core.model.loss import decoder_of

    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        raise UserError("model.adapter: this model's decoder has no `layers`; name the layers "
                        "to adapt in adapter.target_modules")
    prefix = next(n for n, m in model.named_modules() if m is layers)
    names = sorted({n.rsplit(".", 1)[-1] for layer in layers for n, m in layer.named_modules()
                    if n and isinstance(m, _linear_types())})
    if not names:
        raise UserError("model.adapter: the decoder blocks hold no linear layers; set "
                        "adapter.target_modules")
    return rf"{re.escape(prefix)}\.\d+\.(?:.*\.)?(?:{'|'.join(map(re.escape, names))})"


def _matches(name: str, wanted: str) -> bool:
    return name == wanted or name.endswith("." + wanted)


def check_module_names(model: Any, cfg: TrainerConfig) -> None:
    """Each name in ``target_modules`` and ``modules_to_save`` names a module of this model
    (peft would otherwise fail with a long message, or not at all for some of them)."""
    a = cfg.adapter
    names = [n for n, _ in model.named_modules()]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, _linear_types())})
    for field, wanted in (("target_modules", a.target_modules or []),
                          ("modules_to_save", a.modules_to_save)):
        for w in wanted:
            if not any(_matches(n, w) for n in names):
                raise UserError(f"adapter.{field}: {w!r} names no module of this model (its "
                                f"linear layers: {', '.join(linear)})")
    if a.target_modules:
        for w in a.target_modules:
            if not any(_matches(n, w) and isinstance(m, _linear_types())
                       for n, m in model.named_modules()):
                raise UserError(f"adapter.target_modules: {w!r} is not a linear layer (those "
                                f"are: {', '.join(linear)})")
    tied = getattr(model.config, "tie_word_embeddings", False)
    heads = {"lm_head", "embed_tokens"}
    out_name = next((n for n, m in model.named_modules()
                     if m is model.get_output_embeddings()), "lm_head")
    in_name = next((n for n, m in model.named_modules()
                    if m is model.get_input_embeddings()), "embed_tokens")
    for w in a.modules_to_save:
        if _matches(out_name, w) or (tied and (_matches(in_name, w) or w in heads)):
            raise UserError(f"adapter.modules_to_save: {w!r}: the output embedding"
                            + (" (tied to the input embedding in this model)" if tied else "")
                            + " cannot be trained in full with an adapter yet")


def wrap(model: Any, cfg: TrainerConfig, parallel: Any = None) -> Any:
    """The loaded base with adapters injected and frozen elsewhere (a ``PeftModel``); the
    model unchanged without an adapter. Adapter weights start as peft initialises them (A
    random from the torch seed, B zero: the wrapped model computes exactly the base)."""
    if not enabled(cfg):
        return model
    if parallel is not None and getattr(parallel, "strategy", "") == "fsdp":
        raise UserError("environment.distributed: fsdp with model.adapter is not supported "
                        "yet (checkpoints and the final save gather full states); use ddp, "
                        "which an adapter's small gradients suit anyway")
    require_peft(cfg)
    from peft import LoraConfig, get_peft_model

    check_module_names(model, cfg)
    a = cfg.adapter
    config = LoraConfig(
        r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout,
        target_modules=list(a.target_modules) if a.target_modules else default_targets(model),
        use_dora=a.use_dora, modules_to_save=list(a.modules_to_save) or None, bias="none",
        task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads a property transformers renamed
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def is_adapter_model(model: Any) -> bool:
    """Whether ``model`` is a peft model (without importing peft)."""
    return type(model).__module__.startswith("peft.") and hasattr(model, "peft_config")


# --------------------------------------------------------------------------- checkpoints


def checkpoint_weights(model: Any) -> dict[str, Any]:
    """The adapter's tensors as peft saves them (live tensors: copy before training goes on)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def save_adapter(model: Any, dest: Path, weights: dict[str, Any] | None = None) -> None:
    """``dest/adapter_model.safetensors`` and ``dest/adapter_config.json``: what
    ``peft.PeftModel.from_pretrained(base, dest)`` loads. ``weights``: a host copy of
    :func:`checkpoint_weights` (a background checkpoint's); default: the model's own."""
    from safetensors.torch import save_file

    weights = checkpoint_weights(model) if weights is None else weights
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()},
              str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    config.inference_mode = True  # as peft saves it
    config.save_pretrained(str(dest))


def adapter_weights_file(checkpoint: Path) -> Path | None:
    """The adapter weights of a checkpoint written by an adapter run, else None."""
    path = Path(checkpoint) / ADAPTER_DIR / ADAPTER_WEIGHTS
    return path if path.is_file() else None


def load_adapter_weights(model: Any, weights: dict[str, Any], where: Path) -> None:
    """Load a checkpoint's adapter weights strictly (missing or extra tensors, or a shape
    that differs, is an error listing them)."""
    if not is_adapter_model(model):
        raise UserError(f"{where} holds adapter weights only, but this run trains the full "
                        "model (model.adapter: none); resume with the run's model.adapter")
    from peft import set_peft_model_state_dict

    own = checkpoint_weights(model)
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        parts = [f"{label} {len(keys)} tensor(s): {', '.join(keys[:6])}"
                 + (" ..." if len(keys) > 6 else "")
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise UserError(f"{where} does not match this run's adapter: {'; '.join(parts)}")
    for k, t in weights.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise UserError(f"{where}: adapter tensor {k} has shape {tuple(t.shape)}, this "
                            f"run's adapter expects {tuple(own[k].shape)}")
    set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)


def attach(model: Any, adapter_dir: Path) -> Any:
    """``model`` (the base) with the adapter saved in ``adapter_dir`` on it, for generation."""
    if importlib.util.find_spec("peft") is None:
        raise UserError(f"{adapter_dir}: an adapter needs the peft package, which is not "
                        "installed: pip install 'trainer-core[lora]'")
    from peft import PeftModel

    with warnings.catch_warnings():  # peft reads a property transformers renamed
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter_dir))


# --------------------------------------------------------------------------- merged output


def merged_state_dict(model: Any) -> dict[str, Any]:
    """The base model's state dict with every adapter merged in, under the base's own names,
    built from new tensors (the model is not changed: no merge and unmerge round trip, whose
    rounding would alter the base). 4-bit base weights are dequantized; floating tensors are
    in the dtype of the input embedding. Tied tensors appear once."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    from peft.utils.integrations import dequantize_module_weight

    base = model.get_base_model()
    dtype = base.get_input_embeddings().weight.dtype
    out: dict[str, Any] = {}
    seen: set[tuple[Any, ...]] = set()

    def emit(name: str, t: Any) -> None:
        key = (t.device, t.data_ptr(), tuple(t.shape))
        if t.data_ptr() and key in seen:  # a tied tensor: saved once, as save_pretrained does
            return
        seen.add(key)
        t = t.detach().to("cpu")
        out[name] = t.to(dtype) if t.is_floating_point() else t

    done: list[str] = []
    with torch.no_grad():
        for name, module in base.named_modules():
            if any(name.startswith(d + ".") for d in done):
                continue
            prefix = f"{name}." if name else ""
            if isinstance(module, LoraLayer):
                done.append(name)
                emit(prefix + "weight", merged_weight(module))
                bias = getattr(module.get_base_layer(), "bias", None)
                if bias is not None:
                    emit(prefix + "bias", bias)
            elif isinstance(module, ModulesToSaveWrapper):
                done.append(name)
                trained = module.modules_to_save[ADAPTER_NAME]
                for k, v in trained.state_dict(keep_vars=True).items():
                    emit(prefix + k, v)
            elif type(module).__name__ == "Linear4bit":  # a 4-bit layer without an adapter
                done.append(name)
                emit(prefix + "weight", dequantize_module_weight(module))
                if module.bias is not None:
                    emit(prefix + "bias", module.bias)
            else:
                for k, v in module._parameters.items():
                    if v is not None:
                        emit(prefix + k, v)
                for k, v in module._buffers.items():
                    if v is not None and k not in module._non_persistent_buffers_set:
                        emit(prefix + k, v)
    return out


def merged_weight(layer: Any) -> Any:
    """``W + (alpha / r) B @ A`` of one LoRA layer (DoRA: its magnitude-scaled form), as a new
    tensor, computed by peft's own merge arithmetic."""
    from peft.utils.integrations import dequantize_module_weight

    weight = dequantize_module_weight(layer.get_base_layer()).detach().clone()
    if ADAPTER_NAME in getattr(layer, "lora_variant", {}):  # DoRA
        return layer.lora_variant[ADAPTER_NAME].merge_safe(layer, ADAPTER_NAME, weight)
    return weight + layer.get_delta_weight(ADAPTER_NAME).to(weight.dtype)


def write_merged(model: Any, base_dir: Path, output_dir: Path) -> None:
    """The merged model as an ordinary model directory in ``output_dir``: safetensors weights
    (sharded like transformers' at 5 GB), the base's ``config.json`` with only ``dtype``
    changed where the saved dtype differs (``use_cache`` and everything else as the base had
    it; no quantization config), and the base's ``generation_config.json``."""
    import shutil

    from huggingface_hub import save_torch_state_dict

    state = merged_state_dict(model)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state, str(output_dir), max_shard_size="5GB")
    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    dtype = str(next(t.dtype for t in state.values() if t.is_floating_point()))
    dtype = dtype.removeprefix("torch.")
    if config.get("dtype", config.get("torch_dtype")) != dtype:
        config.pop("torch_dtype", None)
        config["dtype"] = dtype
    (output_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                            encoding="utf-8")
    if (Path(base_dir) / "generation_config.json").is_file():
        shutil.copyfile(Path(base_dir) / "generation_config.json",
                        output_dir / "generation_config.json")


def save_final(model: Any, base_dir: Path, output_dir: Path, merged: bool = True) -> None:
    """A finished adapter run's model: ``adapter/`` and (``output.save_merged``) the merged
    model directory around it."""
    save_adapter(model, Path(output_dir) / ADAPTER_DIR)
    if merged:
        write_merged(model, base_dir, Path(output_dir))


# --------------------------------------------------------------------------- what a run records


def adapter_facts(cfg: TrainerConfig) -> dict[str, Any]:
    """The adapter settings a checkpoint records and a resume compares (None: full model)."""
    if not enabled(cfg):
        return {"adapter": None}
    a = cfg.adapter
    return {"adapter": {"kind": cfg.model.adapter, "rank": a.rank, "alpha": a.alpha,
                        "dropout": a.dropout, "target_modules": a.target_modules,
                        "use_dora": a.use_dora, "modules_to_save": list(a.modules_to_save)}}


def adapter_plan(cfg: TrainerConfig, model_dir: Path) -> dict[str, Any] | None:
    """For ``--dry-run``: trainable and total parameters, counted on a weightless (meta
    device) copy of the model with the adapter injected, and the base's weight bytes."""
    if not enabled(cfg):
        return None
    require_peft(cfg)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer_core.model.loading import pick_device, quiet_hf

    quiet_hf()
    device = pick_device(cfg)
    check_device(cfg, device)
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True,
                                        trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.model.trust_remote_code)
    total = sum(p.numel() for p in base.parameters())
    model = wrap(base, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # QLoRA quantizes the adapted linear layers' weights (~0.53 bytes each: 4 bits plus the
    # double-quantized scales); the rest of the base stays in the compute dtype.
    adapted = sum(m.get_base_layer().weight.numel() for m in model.modules()
                  if hasattr(m, "lora_A") and hasattr(m, "get_base_layer"))
    kw = base_dtype(cfg, device)
    per = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}[kw]
    base_bytes = ((total - adapted) * per + adapted * 0.53 if cfg.model.adapter == "qlora"
                  else total * per)
    return {"kind": cfg.model.adapter, "rank": cfg.adapter.rank, "use_dora": cfg.adapter.use_dora,
            "trainable_parameters": trainable, "total_parameters": total,
            "base_weight_bytes": int(base_bytes)}


def base_dtype(cfg: TrainerConfig, device: Any) -> Any:
    """The dtype the frozen base is loaded in (see :func:`load_kwargs`)."""
    import torch

    from trainer_core.model.loading import pick_precision, weight_dtype

    if cfg.model.dtype == "auto" and pick_precision(cfg, device) == "bf16":
        return torch.bfloat16
    return weight_dtype(cfg)
