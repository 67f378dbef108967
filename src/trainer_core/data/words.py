"""Byte-level BPE tokenization one distinct word at a time (preprocessing's fast path).

A byte-level BPE fast tokenizer (the Qwen, Llama 3 and GPT-4o style: a ``Split`` regular
expression, then ``ByteLevel`` without its own expression) cuts text at its added tokens
(``<|im_start|>``...), normalizes each piece (NFC or nothing), splits it into words with one
regular expression and encodes every word on its own: a word's ids and offsets do not depend
on where it occurs. Chat data repeats the same words endlessly, and the tokenizer spends most
of its time in that split. :class:`WordEncoder` splits with the ``regex`` package (several
times faster), encodes each distinct word once with the tokenizer itself and assembles the
batch with array operations. The result is the tokenizer's own ``encode_batch`` output
(ids and character offsets), which the tests check on adversarial text.

It holds only where this reasoning is exact, so it declines (``for_backend`` returns
``None``; ``encode`` leaves a text to the tokenizer) for:
another tokenizer shape; added tokens with strip/single-word/normalized flags; text not in
NFC under an NFC normalizer; a character on which the ``regex`` split and the tokenizer's own
disagree (each new character is probed once, in every context the expression tells apart);
words that do not cover their text; a word the tokenizer would split further on its own.
"""

from __future__ import annotations

import json
import re
import unicodedata
from itertools import chain
from typing import Any

import numpy as np

#: Contexts each character is probed in: alone, next to letters, digits, spaces, newlines,
#: punctuation, itself and the apostrophe of the contraction alternatives.
PROBES = ("{c}", "a{c}", "{c}a", "1{c}", "{c}1", " {c}", "{c} ", "  {c}", "{c}  a", "\n{c}",
          "{c}\n", "\r{c}", "{c}\r\n", "\t{c}", "{c}{c}", " {c}{c}a", "'{c}", "'{c}{c}",
          "a {c} b", "!{c}", "{c}!", "a{c}1{c} {c}\n")


class WordEncoder:
    """Encodes texts like ``backend.encode_batch(texts, add_special_tokens=False)`` (ids and
    offsets) for the byte-level BPE tokenizers described in the module docstring.

    Build it with :meth:`for_backend`. Not thread-safe (one per process: forked workers
    inherit a copy and grow their own word table).
    """

    def __init__(self, backend: Any, split: Any, added: dict[str, int]) -> None:
        self.backend = backend
        self.split = split
        self.added = (re.compile("(" + "|".join(re.escape(t) for t in
                                                sorted(added, key=len, reverse=True)) + ")")
                      if added else None)
        self.nfc = backend.normalizer is not None
        self.index: dict[str, int] = {}  # word (or added token) -> entry
        self._ids: list[int] = []  # entry tokens, back to back
        self._offsets: list[tuple[int, int]] = []  # their offsets inside the word
        self._starts: list[int] = []  # first token of each entry in _ids
        self._counts: list[int] = []  # tokens of each entry
        self._arrays: tuple[np.ndarray, ...] | None = None
        self.safe: set[str] = set()
        self.unsafe: set[str] = set()
        for text, tid in added.items():
            self._register(text, [tid], [(0, len(text))])
        self._check_chars(set(map(chr, range(128))))

    @classmethod
    def for_backend(cls, backend: Any) -> WordEncoder | None:
        """An encoder for ``backend`` (a ``tokenizers.Tokenizer`` without truncation or
        padding), or ``None`` when it is not of the supported shape."""
        try:
            import regex
        except ImportError:
            return None
        try:
            if type(backend.model).__name__ != "BPE" or getattr(backend.model, "dropout", None):
                return None
            norm = backend.normalizer
            if norm is not None and json.loads(norm.__getstate__()) != {"type": "NFC"}:
                return None
            post = backend.post_processor
            if post is not None:
                state = json.loads(post.__getstate__())
                if state.get("type") != "ByteLevel" or state.get("trim_offsets"):
                    return None
            pre = json.loads(backend.pre_tokenizer.__getstate__())
            steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
            if len(steps) != 2:
                return None
            split, level = steps
            if not (split.get("type") == "Split" and split.get("behavior") == "Isolated"
                    and not split.get("invert") and "Regex" in split.get("pattern", {})
                    and level.get("type") == "ByteLevel" and not level.get("add_prefix_space")
                    and not level.get("use_regex")):
                return None
            added: dict[str, int] = {}
            for tid, tok in backend.get_added_tokens_decoder().items():
                if tok.lstrip or tok.rstrip or tok.single_word or tok.normalized \
                        or len(tok.content) < 2:
                    return None
                added[tok.content] = tid
            if backend.truncation is not None or backend.padding is not None \
                    or getattr(backend, "encode_special_tokens", False):
                return None  # (the last: special tokens spelled out as text, not split off)
            pattern = regex.compile(split["pattern"]["Regex"])
        except Exception:  # an unknown component or a pattern `regex` does not read
            return None
        return cls(backend, pattern, added)

    # ------------------------------------------------------------------ checks

    def _check_chars(self, chars: set[str]) -> bool:
        """Probe new characters: True when the ``regex`` split agrees with the tokenizer's
        pre-tokenizer on every one of them."""
        pre = self.backend.pre_tokenizer
        ok = True
        for c in chars - self.safe:
            if c in self.unsafe:
                ok = False
                continue
            for probe in PROBES:
                text = probe.format(c=c)
                ours = [m.span() for m in self.split.finditer(text)]
                theirs = [span for _, span in pre.pre_tokenize_str(text)]
                if ours != theirs:
                    self.unsafe.add(c)
                    ok = False
                    break
            else:
                self.safe.add(c)
        return ok

    def _register(self, word: str, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        self.index[word] = len(self._starts)
        self._starts.append(len(self._ids))
        self._counts.append(len(ids))
        self._ids.extend(ids)
        self._offsets.extend(offsets)
        self._arrays = None

    def _add_words(self, words: list[str]) -> set[str]:
        """Encode new words with the tokenizer; returns those that cannot be cached exactly
        (not in NFC under an NFC normalizer, or split further when encoded on their own)."""
        bad = {w for w in words if not unicodedata.is_normalized("NFC", w)} if self.nfc else set()
        words = [w for w in words if w not in bad]
        for word, enc in zip(words, self.backend.encode_batch(words, add_special_tokens=False),
                             strict=True):
            if any(w != 0 for w in enc.word_ids):
                bad.add(word)
            else:
                self._register(word, enc.ids, enc.offsets)
        return bad

    def _table(self) -> tuple[np.ndarray, ...]:
        if self._arrays is None:
            self._arrays = (np.array(self._counts, np.int64), np.array(self._starts, np.int64),
                            np.array(self._ids, np.int32),
                            np.array(self._offsets, np.int64).reshape(-1, 2))
        return self._arrays

    # ------------------------------------------------------------------ encoding

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, offsets, lengths, done)`` for ``texts``: every token's id and ``(start, end)``
        character offsets in its text, each text's token count, and whether each text was
        encoded here. Texts not ``done`` (see the module docstring) have no tokens in the
        result: the caller gives them to the tokenizer."""
        done = np.ones(len(texts), np.bool_)
        pieces: list[list[str]] = []  # per text: its words and added tokens, in order
        split_words = self.split.findall
        cut = self.added.split if self.added is not None else None
        for i, text in enumerate(texts):
            units: list[str] = []
            pieces.append(units)
            if not text.isascii():
                if self.nfc and not unicodedata.is_normalized("NFC", text):
                    done[i] = False
                    continue
                new = set(text).difference(self.safe)
                if new and not self._check_chars(new):
                    done[i] = False
                    continue
            if cut is None:
                units.extend(split_words(text))
            else:
                for k, piece in enumerate(cut(text)):
                    if k % 2:
                        units.append(piece)
                    elif piece:
                        units.extend(split_words(piece))
            if sum(map(len, units)) != len(text):  # gaps: the tokenizer's split keeps them
                done[i] = False
        found = list(map(self.index.get, chain.from_iterable(pieces)))
        if None in found:
            units_now = list(chain.from_iterable(pieces))
            bad = self._add_words(sorted({u for u, f in zip(units_now, found, strict=True)
                                          if f is None}))
            for i, units in enumerate(pieces):
                if bad and done[i] and not bad.isdisjoint(units):
                    done[i] = False
                    pieces[i] = []
            found = list(map(self.index.get, chain.from_iterable(pieces)))
        for i in np.flatnonzero(~done).tolist():
            pieces[i] = []
        per_text = [len(units) for units in pieces]
        all_units = list(chain.from_iterable(pieces))
        if len(found) != len(all_units):  # texts dropped after the look-up
            found = list(map(self.index.get, all_units))
        ix = np.array(found, np.int64)
        unit_len = np.fromiter(map(len, all_units), np.int64, len(all_units))
        char_at = np.zeros(len(all_units) + 1, np.int64)  # start of each unit, all texts
        np.cumsum(unit_len, out=char_at[1:])
        bounds = np.zeros(len(texts) + 1, np.int64)  # first unit of each text
        np.cumsum(per_text, out=bounds[1:])
        local = char_at[:-1] - np.repeat(char_at[bounds[:-1]], per_text)  # start in its text
        counts, starts, flat_ids, flat_offsets = self._table()
        per_unit = counts[ix]
        tok_at = np.zeros(len(all_units) + 1, np.int64)  # first token of each unit
        np.cumsum(per_unit, out=tok_at[1:])
        total = int(tok_at[-1])
        unit_of = np.repeat(np.arange(len(all_units)), per_unit)
        flat = starts[ix][unit_of] + (np.arange(total) - tok_at[:-1][unit_of])
        ids = flat_ids[flat]
        offsets = flat_offsets[flat] + local[unit_of][:, None]
        lengths = tok_at[bounds[1:]] - tok_at[bounds[:-1]]
        return ids, offsets, lengths, done
