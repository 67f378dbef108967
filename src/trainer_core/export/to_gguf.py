"""A model directory as one GGUF file for llama.cpp, Ollama and LM Studio.

Written with the ``gguf`` package (llama.cpp's own Python writer): its tensor-name maps, its
special-vocabulary reader and its numpy quantizers, so names, metadata keys and block layouts
are llama.cpp's. The conventions followed are those of llama.cpp's ``convert_hf_to_gguf.py``:

* tensors: 1-D ones (norms) stay F32; 2-D ones take the requested type. ``q8_0`` needs rows
  of a multiple of 32 values; a narrower tensor falls back to F16 as llama.cpp's converter
  does. A tied output projection is not written (llama.cpp reuses ``token_embd``).
* Llama's q/k projections are permuted to llama.cpp's rotary layout (Qwen3's are not: it uses
  the NeoX layout).
* tokenizer: byte-level BPE only (``tokenizer.ggml.model = gpt2``): every id up to the
  model's ``vocab_size`` gets a token, ids the tokenizer lacks become ``[PADn]`` (UNUSED);
  added tokens are CONTROL when special (or spelled ``<|...|>``), else USER_DEFINED. The
  pre-tokenizer type is recognised from ``tokenizer.json`` (:data:`PRE_TOKENIZERS`).
* the chat template is the directory's own (``chat_template.jinja``, else
  ``tokenizer_config.json``), i.e. for a run the template training rendered with.

Tensors are converted and written one at a time, so memory stays near one tensor's size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_core.errors import UserError
from trainer_core.export import Source, iter_weights, weight_names

#: ``--type`` values; :func:`_types` maps each to (GGML type of 2-D tensors, file type).
GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")

#: Split regexes of byte-level BPE tokenizers -> llama.cpp's pre-tokenizer name.
PRE_TOKENIZER_REGEXES = {
    # Qwen2 / Qwen2.5 / Qwen3 (single digits)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    # Llama 3 (digits in threes)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}
#: The other recognised pre-tokenizers, by the steps ``tokenizer.json`` lists.
PRE_TOKENIZER_STEPS = {
    ("Digits(individual)", "ByteLevel(regex)"): "smollm",  # SmolLM / SmolLM2
    ("ByteLevel(regex)",): "gpt-2",
}
PRE_TOKENIZERS = sorted({*PRE_TOKENIZER_REGEXES.values(), *PRE_TOKENIZER_STEPS.values()})


def _types() -> dict[str, tuple[Any, Any]]:
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16),
            "bf16": (q.BF16, f.MOSTLY_BF16), "q8_0": (q.Q8_0, f.MOSTLY_Q8_0)}


def write_gguf(source: Source, dest: Path, gguf_type: str) -> dict[str, Any]:
    """Write ``source`` to ``dest`` as GGUF with 2-D tensors in ``gguf_type``."""
    import gguf
    import numpy as np

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
    qtype, ftype = _types()[gguf_type]
    hp = _hyperparams(source)
    arch = gguf.MODEL_ARCH.QWEN3 if source.architecture == "Qwen3ForCausalLM" \
        else gguf.MODEL_ARCH.LLAMA
    tokens, token_types, pre = _vocab(source.path, hp["vocab_size"])

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_model_name(source.path))
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    special = gguf.SpecialVocab(source.path, load_merges=True, n_vocab=hp["vocab_size"])
    if not special.merges:
        raise UserError(f"{source.path / 'tokenizer.json'}: no BPE merges found")
    from trainer_core.data.tokenizer import saved_chat_template

    special.chat_template = saved_chat_template(source.path)
    special.add_to_gguf(writer, quiet=True)

    names = weight_names(source)
    tied = "lm_head.weight" not in names or bool(source.config.get("tie_word_embeddings"))
    name_map = gguf.get_tensor_name_map(arch, hp["layers"])
    plan: list[tuple[str, str, Any]] = []  # (hf name, gguf name, ggml type)
    shapes = _shapes(source)
    for hf_name in names:
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd when there is no output.weight
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue  # computed, not a weight (old checkpoints saved it)
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{source.path}: tensor {hf_name} has no llama.cpp name for "
                            f"{source.architecture}")
        shape = shapes[hf_name]
        t = qtype if len(shape) == 2 else gguf.GGMLQuantizationType.F32
        if t == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[t][0]:
            t = gguf.GGMLQuantizationType.F16  # rows too short for Q8_0 blocks
        plan.append((hf_name, name, t))
        # Sizes are known before any tensor is converted: infos first, data streamed after.
        byte_shape = gguf.quant_shape_to_byte_shape(shape, t)
        float_dtype = {gguf.GGMLQuantizationType.F32: np.float32,
                       gguf.GGMLQuantizationType.F16: np.float16}.get(t)
        if float_dtype is not None:
            writer.add_tensor_info(name, shape, np.dtype(float_dtype), int(np.prod(byte_shape)))
        else:
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                   raw_dtype=t)

    writer.write_header_to_file(path=dest)
    try:
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        todo, wanted = iter(plan), {p[0] for p in plan}
        for hf_name, array in iter_weights(source):
            if hf_name in wanted:
                item = next(todo)
                assert item[0] == hf_name  # both walk the same files in the same order
                writer.write_tensor_data(_convert(array, item, source, hp))
    finally:
        writer.close()
    counts: dict[str, int] = {}
    for _, _, t in plan:
        counts[t.name] = counts.get(t.name, 0) + 1
    return {"type": gguf_type, "tensors": counts, "pre_tokenizer": pre, "tokens": len(tokens),
            "chat_template": special.chat_template is not None}


def _model_name(path: Path) -> str:
    """``general.name``: the directory's name; a checkpoint's is ``RUN-step-N``."""
    path = path.resolve()
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}-{path.name}"
    return path.name


def _convert(array: Any, item: tuple[str, str, Any], source: Source, hp: dict[str, Any]) -> Any:
    import gguf
    import numpy as np

    hf_name, _, t = item
    if source.architecture == "LlamaForCausalLM":
        # llama.cpp's rotary embedding pairs neighbouring dimensions; HF's pairs halves.
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = _permute(array, hp["heads"])
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = _permute(array, hp["kv_heads"])
    if t == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if t == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), t)


def _permute(weights: Any, heads: int) -> Any:
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _shapes(source: Source) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in source.weight_files:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    return shapes


def _hyperparams(source: Source) -> dict[str, Any]:
    """What llama.cpp needs from ``config.json``; one-line errors for what it cannot run."""
    cfg, where = source.config, source.path / "config.json"

    def need(key: str) -> Any:
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise UserError(f"{where}: {key}: missing or not a number")
        return cfg[key]

    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"{where}: rope type {rope_type!r} is not exported (only the default "
                        "rotary embedding)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise UserError(f"{where}: {key}: models with biases are not exported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act: {cfg['hidden_act']!r} is not exported (silu only)")
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    return {
        "vocab_size": need("vocab_size"),
        "context": need("max_position_embeddings"),
        "hidden": hidden,
        "layers": need("num_hidden_layers"),
        "ffn": need("intermediate_size"),
        "heads": heads,
        "kv_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or hidden // heads,
        "rope_theta": float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        "rms_norm_eps": float(need("rms_norm_eps")),
    }


def _vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """Tokens, token types and pre-tokenizer name from ``folder/tokenizer.json``."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder}: no tokenizer.json (a fast byte-level BPE tokenizer is "
                        "needed for GGUF)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable: {exc}") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") \
            or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{path}: model: only byte-level BPE tokenizers are exported "
                        f"(this one is {model.get('type')}); sentencepiece vocabularies are not")
    pre = _pre_tokenizer(data.get("pre_tokenizer"), path)
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in data.get("added_tokens") or []}
    top = max([*by_id, *added])
    if top >= vocab_size:
        raise UserError(f"{path}: token id {top} is beyond the model's vocab_size {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i in added:
            text = added[i]["content"]
            special = added[i].get("special") or (text.startswith("<|") and text.endswith("|>"))
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows no token uses (Qwen3 pads 151,669 tokens to 151,936 rows)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types, pre


def _pre_tokenizer(pre: Any, path: Path) -> str:
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre]
    steps = [s for s in steps or [] if s]
    if len(steps) == 2 and steps[0].get("type") == "Split" \
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True):
        name = PRE_TOKENIZER_REGEXES.get(str((steps[0].get("pattern") or {}).get("Regex")))
        if name is not None:
            return name
    described = []
    for s in steps:
        if s.get("type") == "Digits":
            described.append("Digits(individual)" if s.get("individual_digits") else "Digits")
        elif s.get("type") == "ByteLevel":
            described.append("ByteLevel(regex)" if s.get("use_regex", True) else "ByteLevel")
        else:
            described.append(str(s.get("type")))
    name = PRE_TOKENIZER_STEPS.get(tuple(described))
    if name is None:
        raise UserError(f"{path}: pre_tokenizer: not one llama.cpp is known to match "
                        f"({' + '.join(described) or 'none'}); recognised: "
                        f"{', '.join(PRE_TOKENIZERS)}")
    return name
