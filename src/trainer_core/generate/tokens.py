"""What generation needs to know of a tokenizer's tokens: the ids that end a turn, and the exact
bytes each id stands for. Shared by the logits processors (:mod:`.processors`) and the format
constraint (:mod:`.formats`), which must not import each other."""

from __future__ import annotations

import weakref
from typing import Any

#: Tokens that end a chat turn (Qwen/ChatML); ``end_of_turn_ids`` keeps those the tokenizer has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids that end a turn: ``<|im_end|>``, ``<|endoftext|>`` (where known) and the EOS id."""
    ids: list[int] = []
    for token in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.append(tid)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the tokenizer has no end-of-turn token and no EOS token")
    return list(dict.fromkeys(ids))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table that byte-level BPE vocabularies use."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class TokenBytes:
    """Maps a token id to the exact bytes it stands for, cached per id.

    Decoding one token at a time with ``tokenizer.decode`` loses information: byte-level BPE
    splits multi-byte characters (emojis) over several tokens, and each piece alone decodes to
    U+FFFD. Working on bytes lets a row's tail be reassembled exactly. Special tokens (padding,
    end of turn) stand for no text. Non-byte-level tokenizers fall back to ``decode``.
    Use ``TokenBytes.of(tokenizer)`` to share one cache across processors and generate calls.
    """

    _shared: weakref.WeakKeyDictionary[Any, TokenBytes] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, tokenizer: Any) -> TokenBytes:
        """The shared instance for ``tokenizer`` (a fresh one if it cannot be weakly keyed)."""
        try:
            hit = cls._shared.get(tokenizer)
            if hit is None:
                hit = cls._shared[tokenizer] = cls(tokenizer)
            return hit
        except TypeError:
            return cls(tokenizer)

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        self._special = set(tokenizer.all_special_ids)
        self._added = {int(i): t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self._size = len(tokenizer)
        probe = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a", add_special_tokens=False))
        self._byte_level = bool(probe) and probe[0].startswith("Ġ")

    def __call__(self, token_id: int) -> bytes:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def _lookup(self, token_id: int) -> bytes:
        if token_id in self._special or not 0 <= token_id < self._size:
            return b""  # padding/end of turn, or a model row beyond the tokenizer's vocabulary
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_level and piece and all(c in _BYTE_DECODER for c in piece):
            return bytes(_BYTE_DECODER[c] for c in piece)
        return self._tokenizer.decode([token_id]).encode()
