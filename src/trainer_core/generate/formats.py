"""Constrained generation: each row held to its :class:`AnswerFormat` (``constrain: strict``).

:class:`FormatConstraint` is a logits processor built on llguidance. Per row it keeps a
matcher of the row's format; at every step it computes the set of tokens that keep the text
inside the format (one bitmask per row, computed for all rows in parallel by llguidance's
executor) and sets every other logit to ``-inf``. End-of-turn tokens are allowed only where the
format is complete; where the format can only end, they are the only tokens left, so the turn
ends there. Rows without a format are left alone.

Length budget: in the last steps before ``max_new_tokens``, each row's *closing* (a shortest
byte string that completes the format from where the row is, found by a breadth-first search
over the format's own bytes) is computed; when greedy decoding's next pick would leave too few
tokens for its closing, the closing is forced token by token instead, then the end of turn.
What is cut is the free part the model was writing (the rest of an answer body, a JSON string,
digits); what the format requires after it (markers, stop runs, closing brackets, required
properties) is written. A closing longer than the whole budget cannot fit: such a row is cut at
the limit and scores ``format_ok: false``.

Costs are kept off the per-step path: the tokenizer's llguidance wrapper is built once per
tokenizer (its token bytes cached on disk under ``$TRAINER_CACHE/grammar``), a format is
compiled once per tokenizer and copied per row, and masks are computed in Rust in parallel.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers

from trainer_core.files import cache_root
from trainer_core.generate.tokens import TokenBytes, end_of_turn_ids
from trainer_core.plugins.answer_format import AnswerFormat, FormatError, check_answer

__all__ = ["AnswerFormat", "FormatConstraint", "FormatError", "check_answer",
           "grammar_tokenizer"]

#: Bump when the on-disk token table changes shape.
CACHE_VERSION = "1"
#: Characters tried when searching a closing, besides those of the format's own text: a
#: letter, a digit, space and newline for any format; JSON's punctuation and literals for JSON.
CLOSING_CHARS = "a0 \n"
JSON_CLOSING_CHARS = '{}[]":,-.0123456789aeflnrstu'
#: In the last ``CLOSING_RESERVE`` steps each row carries a closing known to be valid from
#: where it is (updated cheaply per token: the closing's rest when the token began it, else the
#: same closing if still valid); a shortest closing is searched only when that one is not
#: ``LOOKAHEAD_SLACK`` tokens shorter than the room left. Greedy's next pick is then checked
#: (a second search, unless the closing still fits after it).
LOOKAHEAD_SLACK = 3
#: The closing search gives up after this many matcher states (a format whose closing it
#: cannot find is then cut at the limit instead).
MAX_CLOSING_STATES = 300
MAX_CLOSING_BYTES = 256
#: Closings are checked in the last this many steps before the limit, or more for a format
#: whose closing from the start is longer (its length plus ``LOOKAHEAD_SLACK`` and one: a
#: run of emojis that are several tokens each). Greedy's pick is checked against the closing
#: at each of these steps.
CLOSING_RESERVE = 16


# ----------------------------------------------------------------- the tokenizer's wrapper


class _TokenTable:
    """What llguidance needs of a tokenizer: each id's bytes, the special ids, EOS."""

    def __init__(self, tokens: list[bytes], special: list[int], eos: int,
                 encode: Any) -> None:
        self.tokens = tokens
        self.special_token_ids = special
        self.eos_token_id = eos
        self.bos_token_id = None
        self._encode = encode

    def __call__(self, data: bytes) -> list[int]:
        return list(self._encode(data.decode("utf-8", "replace")))


_wrappers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_by_fingerprint: dict[str, Any] = {}


def grammar_tokenizer(tokenizer: Any) -> Any:
    """llguidance's ``LLTokenizer`` for ``tokenizer``, its end-of-turn ids as EOS.

    Built once per tokenizer in a process. Building needs every token's bytes (about a second
    for a 150k vocabulary); they are cached on disk under ``$TRAINER_CACHE/grammar/``, keyed by
    the tokenizer's fingerprint, so a later process only pays llguidance's own construction
    (~0.2 s for 151k tokens, without slices).
    """
    try:
        hit = _wrappers.get(tokenizer)
    except TypeError:
        hit = None
    if hit is not None:
        return hit
    from trainer_core.data.tokenizer import tokenizer_fingerprint

    eos = end_of_turn_ids(tokenizer)
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}:{eos}".encode()).hexdigest()[:32]
    hit = _by_fingerprint.get(key)
    if hit is None:
        import llguidance

        tokens, special = _token_table(tokenizer, key)
        table = _TokenTable(tokens, special, eos[0],
                            lambda text: tokenizer.encode(text, add_special_tokens=False))
        # Without llguidance's "slices" (regexes pre-matched against the vocabulary to speed
        # up masks inside JSON strings): they are most of the construction time (~1 s of
        # ~1.2 s for 151k tokens); JSON-schema formats get them lazily (``_sliced``).
        hit = llguidance.LLTokenizer(llguidance.TokenizerWrapper(table), eos_token=eos,
                                     slices=[])
        _by_fingerprint[key] = hit
    try:
        _wrappers[tokenizer] = hit
    except TypeError:
        pass
    return hit


def _token_table(tokenizer: Any, key: str) -> tuple[list[bytes], list[int]]:
    """Every token's bytes and the special ids, from the disk cache or the tokenizer."""
    path = cache_root() / "grammar" / f"{key}-v{CACHE_VERSION}.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            blob, offsets = data["blob"].tobytes(), data["offsets"].tolist()
            special = data["special"].tolist()
        return [blob[a:b] for a, b in zip(offsets, offsets[1:], strict=False)], special
    except (OSError, KeyError, ValueError):
        pass
    token_bytes = TokenBytes.of(tokenizer)
    special = sorted(set(tokenizer.all_special_ids)
                     | {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special})
    names = dict(zip(special, tokenizer.convert_ids_to_tokens(special), strict=True))
    # Special tokens carry their name (llguidance keeps them out of text; only EOS is used).
    tokens = [names[i].encode() if i in names else token_bytes(i) for i in range(len(tokenizer))]
    offsets = np.zeros(len(tokens) + 1, np.int64)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as out:
            np.savez(out, blob=np.frombuffer(b"".join(tokens), np.uint8), offsets=offsets,
                     special=np.array(special, np.int64))
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the next process a second
        pass
    return tokens, special


# ------------------------------------------------------------------- compiled formats


class _Compiled:
    """A format compiled for one tokenizer: a fresh matcher to copy per row and the one-byte
    tokens the closing search steps with."""

    def __init__(self, ll: Any, fmt: AnswerFormat):
        import llguidance

        self.matcher = llguidance.LLMatcher(_sliced(ll) if fmt.kind == "json_schema" else ll,
                                            fmt.grammar(), log_level=0)
        if self.matcher.is_error():
            raise FormatError(f"{fmt.describe()}: {self.matcher.get_error()}")
        extra = CLOSING_CHARS + (JSON_CLOSING_CHARS if fmt.kind == "json_schema" else "")
        self.alphabet = _alphabet(ll, set(extra) | set(fmt.source))
        #: Set once a loose search found no closing for this format (a counted run, such as
        #: emoji_think's stop run, looks alike at each count): later searches start exact.
        self.exact = False
        #: A shortest closing from the start, each row's known closing at its first step.
        self.start_closing = self.closing(ll, self.matcher)

    def closing(self, ll: Any, matcher: Any) -> list[int] | None:
        """A shortest closing from ``matcher``'s state (:func:`closing_tokens`)."""
        ids, exact = closing_tokens(ll, matcher, self.alphabet, exact_first=self.exact)
        self.exact = self.exact or exact
        return ids


def _alphabet(ll: Any, chars: set[str]) -> list[tuple[tuple[int, ...], bytes]]:
    """The steps of the closing search: each character with the tokens that spell it."""
    out = []
    for char in sorted(chars):
        data = char.encode("utf-8")
        ids = tuple(ll.tokenize_bytes(data))
        if ids and ll.decode_bytes(list(ids)) == data:
            out.append((ids, data))
    return out


@functools.lru_cache(maxsize=16)
def _sliced(ll: Any) -> Any:
    """``ll`` with llguidance's general slices: faster masks inside JSON strings (built on
    the first JSON-schema format, ~0.4 s for 151k tokens)."""
    import llguidance

    return ll.with_slices(llguidance.LLTokenizer.general_slices())


@functools.lru_cache(maxsize=256)
def _compiled(ll: Any, fmt: AnswerFormat) -> _Compiled:
    return _Compiled(ll, fmt)


def compiled_format(tokenizer: Any, fmt: AnswerFormat) -> Any:
    """A fresh llguidance matcher of ``fmt`` for ``tokenizer`` (compiled once, then copied)."""
    return _compiled(grammar_tokenizer(tokenizer), fmt).matcher.deep_copy()


Alphabet = Sequence[tuple[tuple[int, ...], bytes]]  # (the tokens of a character, its bytes)


def closing_bytes(matcher: Any, alphabet: Alphabet, exact: bool = False,
                  max_states: int = MAX_CLOSING_STATES) -> bytes | None:
    """A short text (over ``alphabet``'s characters) that takes ``matcher`` to a complete text;
    ``None`` when none is found within ``max_states`` states.

    Breadth-first, so it finds a shortest closing among the states it keeps. A state's
    signature is which characters of the alphabet may come next.
    A character that leaves the signature unchanged is not followed (more free text), unless
    it was the only possible one (a literal such as ``>>``), and a state whose signature was
    already seen is dropped. That can merge states that only look alike (the counts of
    ``x{3}``, the text before and after a marker); ``exact`` then tells states apart by the
    characters written inside literals on the way (steps from or into a state where only one
    character is possible). Pruning
    can make the closing longer or miss it, never make it invalid: every step is consumed by
    the real matcher.
    """
    if matcher.is_accepting():
        return b""
    start = matcher.deep_copy()
    frontier = [(start, b"", _signature(start, alphabet), b"")]
    seen = {(frontier[0][2], b"")}
    for _ in range(MAX_CLOSING_BYTES):
        following = []
        for state, path, sig, literal in frontier:
            forced = sum(sig[0]) == 1  # one character possible: a literal being written
            for ids, data in alphabet:
                if state.validate_tokens(list(ids)) != len(ids):
                    continue
                child = state.deep_copy()
                child.consume_tokens(list(ids))
                step = path + data
                if child.is_accepting():
                    return step
                child_sig = _signature(child, alphabet)
                if child_sig == sig and not forced:
                    continue  # more of the same free text
                # The characters written inside literals (steps from or into a state with one
                # possible character): with ``exact`` they tell look-alike states apart.
                if forced or sum(child_sig[0]) == 1:
                    child_literal = literal + data
                else:
                    child_literal = literal
                key = (child_sig, child_literal if exact else b"")
                if key in seen:
                    continue
                seen.add(key)
                if len(seen) > max_states:
                    return None
                following.append((child, step, child_sig, child_literal))
        if not following:
            return None
        frontier = following
    return None


def _signature(matcher: Any, alphabet: Alphabet) -> tuple[bytes]:
    """Which characters of the alphabet may come next (a token mask would tell more states
    apart but costs ~1 ms a state on a 150k vocabulary; the literal paths of ``exact`` do)."""
    return (bytes(matcher.validate_tokens(list(ids)) == len(ids) for ids, _ in alphabet),)


def closing_tokens(ll: Any, matcher: Any, alphabet: Alphabet,
                   exact_first: bool = False) -> tuple[list[int] | None, bool]:
    """The tokens of :func:`closing_bytes` (``None``: none found), and whether the exact
    search was needed: as few tokens as the tokenizer gives (checked against ``matcher``),
    else character by character as the search found it. ``exact_first`` skips the loose
    search."""
    data = None if exact_first else closing_bytes(matcher, alphabet)
    exact = data is None
    if exact:  # merged too much: tell states apart by the literals written too
        data = closing_bytes(matcher, alphabet, exact=True)
    if data is None:
        return None, exact
    return _closing_ids(ll, matcher, alphabet, data), exact


def _closing_ids(ll: Any, matcher: Any, alphabet: Alphabet, data: bytes) -> list[int]:
    """The tokens spelling the closing ``data`` from ``matcher``'s state."""
    if not data:
        return []
    ids = ll.tokenize_bytes(data)
    if completes(ll, matcher, ids):
        return list(ids)
    # One character at a time, as the search consumed them.
    out: list[int] = []
    probe = matcher.deep_copy()
    rest = data
    while rest:
        ids, piece = next((i, d) for i, d in alphabet if rest.startswith(d)
                          and probe.validate_tokens(list(i)) == len(i))
        probe.consume_tokens(list(ids))
        out.extend(ids)
        rest = rest[len(piece):]
    return out


def completes(ll: Any, matcher: Any, ids: list[int]) -> bool:
    """Whether ``ids`` take ``matcher`` to a complete text (it is left unchanged).

    Asked as "are ``ids`` and then the end of turn valid": a few microseconds, where copying
    the matcher and consuming took ~50 us (it was a tenth of a demo-model step at batch 16).
    """
    return matcher.validate_tokens([*ids, ll.eos_token]) == len(ids) + 1


# ------------------------------------------------------------------------------ processor


_executor: Any = None


def _mask_executor() -> Any:
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor()
    return _executor


class FormatConstraint(transformers.LogitsProcessor):
    """Hold each row of a batched, left-padded generation to its format (``None``: free).

    ``formats`` has one entry per prompt, in order; ``max_new_tokens`` is the generation's
    limit (the closing is forced before it, see the module docstring). Create one per
    ``generate`` call; like the other processors it starts over when a call starts over.
    ``violations`` counts rows whose matcher rejected a token (sampling that ignored the mask,
    or a processor placed after this one); such rows are left unconstrained from there.
    ``greedy=True`` (the caller decodes greedily and nothing after this processor changes the
    scores): a row whose best token is allowed is left unmasked, since its pick is the same;
    the returned scores are then masked only where that changes the pick.
    """

    def __init__(self, tokenizer: Any, formats: Sequence[AnswerFormat | None],
                 max_new_tokens: int, greedy: bool = False):
        self.ll = grammar_tokenizer(tokenizer)
        self.formats = list(formats)
        self.compiled = [None if f is None else _compiled(self.ll, f) for f in self.formats]
        self.max_new_tokens = max_new_tokens
        self.end_list = end_of_turn_ids(tokenizer)
        self.end_ids = set(self.end_list)
        self.words = (self.ll.vocab_size + 31) // 32
        #: Per row, how many steps before the limit its closing is checked.
        self.reserve = [0 if c is None else max(CLOSING_RESERVE, len(c.start_closing or ())
                                                + LOOKAHEAD_SLACK + 1)
                        for c in self.compiled]
        self.max_reserve = max(self.reserve, default=0)
        self.greedy = greedy
        self.violations = 0
        self._length = -1
        self._prompt_len = 0
        self.matchers: list[Any] = []
        self.forced: list[deque[int] | None] = []
        self.done: list[bool] = []
        #: Per row, a closing known to be valid from where the row is (an upper bound on the
        #: shortest one's length), carried from step to step so most steps need no search.
        self.known: list[list[int] | None] = []
        #: Whether the row's known closing is a shortest one (a shortest closing's rest,
        #: after the token that began it, is a shortest one again).
        self.shortest: list[bool] = []
        #: The signature (see :func:`closing_bytes`) of the row's state where its known
        #: closing was last a shortest one: a state reached by text that keeps the signature
        #: and the closing valid is one the search itself would not tell apart.
        self.signature: list[tuple[bytes] | None] = []
        #: Per row, the token greedy picked last step and a shortest closing from the state
        #: after it, when ``_budget`` searched one (used if that token was chosen).
        self.searched: list[tuple[int, list[int]] | None] = []

    def _start(self, batch: int, length: int) -> None:
        if batch != len(self.formats):
            raise ValueError(f"{len(self.formats)} formats for a batch of {batch} rows")
        self._prompt_len = length
        self.matchers = [None if c is None else c.matcher.deep_copy() for c in self.compiled]
        self.forced = [None] * batch
        self.done = [m is None for m in self.matchers]
        self.known = [None if c is None else c.start_closing for c in self.compiled]
        self.shortest = [True] * batch
        self.signature = [None] * batch
        self.searched = [None] * batch

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, length = input_ids.shape
        if length != self._length + 1 or batch != len(self.matchers):
            self._start(batch, length)
        else:
            self._consume(input_ids[:, -1].tolist())
        self._length = length
        active = [r for r in range(batch) if not self.done[r]]
        if not active:
            return scores
        remaining = self.max_new_tokens - (length - self._prompt_len)
        # Greedy's pick per row, computed once a step (the mask and the budget both ask).
        closing_due = remaining <= self.max_reserve
        picks = _Picks(scores) if self.greedy or closing_due else None
        # In place (as transformers' own processors do): no copy of the batch's logits.
        self._mask(scores, [r for r in active if self.forced[r] is None], picks)
        for row in active:
            forced = self.forced[row]
            if forced is not None:  # a closing being written, then the end of turn
                _only(scores, row, forced[0] if forced else self.end_list[0])
        if closing_due:
            for row in active:
                self._budget(row, remaining, scores, picks)
        return scores

    def _consume(self, new: list[int]) -> None:
        for row, token in enumerate(new):
            if self.done[row]:
                continue
            if token in self.end_ids:
                self.done[row] = True
                continue
            forced = self.forced[row]
            if forced:
                forced.popleft()
            matcher = self.matchers[row]
            if not matcher.consume_token(token):
                self.violations += 1
                self.done[row] = True
                continue
            searched, self.searched[row] = self.searched[row], None
            known = self.known[row]
            if searched is not None and searched[0] == token:
                self.known[row], self.shortest[row] = searched[1], True
            elif known is not None:
                self.shortest[row] = self.shortest[row] and bool(known) and known[0] == token
                self.known[row] = self._still_closing(matcher, known, token)

    def _still_closing(self, matcher: Any, known: list[int], token: int) -> list[int] | None:
        """A closing from ``matcher``'s new state, from the one known before ``token``: its
        rest when ``token`` began it, else itself when still valid (``None``: search again)."""
        if known and known[0] == token:
            return known[1:]
        candidates = [known]
        data, head = self.ll.decode_bytes(known), self.ll.decode_bytes([token])
        if head and data.startswith(head):  # the token wrote the closing's first bytes
            candidates.insert(0, list(self.ll.tokenize_bytes(data[len(head):])))
        for ids in candidates:
            if completes(self.ll, matcher, ids):  # an empty closing: complete already
                return ids
        return None

    def _mask(self, scores: torch.Tensor, rows: list[int], picks: _Picks | None) -> None:
        """Set the logits of tokens outside each row's format to ``-inf``.

        Under greedy decoding a row whose best token is already allowed needs no mask (its
        pick is the same either way), so masks are computed only for the other rows.
        """
        vocab = scores.shape[1]
        width = min(vocab, self.ll.vocab_size)
        if self.greedy and rows and picks is not None:
            rows = [r for r in rows if not self._allows(r, picks[r], width)]
        if not rows:
            return
        if picks is not None:
            picks.changed(rows)
        masks = np.empty((len(rows), self.words), np.int32)
        _mask_executor().unsafe_compute_mask_ptr(
            [(self.matchers[r], i) for i, r in enumerate(rows)], masks.ctypes.data,
            self.words * 4, len(rows))
        # Unpack the inverted bits: a one is a banned token (no negation of the big array).
        banned = torch.from_numpy(np.unpackbits(
            np.invert(masks).view(np.uint8), axis=1, bitorder="little")).view(torch.bool)
        banned = banned[:, :width]
        if len(rows) == scores.shape[0]:
            scores[:, :width].masked_fill_(banned.to(scores.device), float("-inf"))
            scores[:, width:] = float("-inf")
            return
        for i, row in enumerate(rows):
            scores[row, :width].masked_fill_(banned[i].to(scores.device), float("-inf"))
            scores[row, width:] = float("-inf")

    def _allows(self, row: int, token: int, width: int) -> bool:
        """Whether ``row``'s matcher accepts ``token`` next (what its mask would say)."""
        if token >= width:
            return False
        if token in self.end_ids:
            return bool(self.matchers[row].is_accepting())
        return bool(self.matchers[row].validate_tokens([token]) == 1)

    def _budget(self, row: int, remaining: int, scores: torch.Tensor, picks: _Picks) -> None:
        """Force the row's closing now if greedy's next token would leave no room for it."""
        compiled = self.compiled[row]
        if self.forced[row] is not None or compiled is None or remaining > self.reserve[row]:
            return
        known = self.known[row]
        if known is not None and len(known) + LOOKAHEAD_SLACK < remaining:
            return  # room to spare: the shortest closing is no longer than this one
        matcher = self.matchers[row]
        signature = _signature(matcher, compiled.alphabet)
        if known is not None and (self.shortest[row] or signature == self.signature[row]):
            closing: list[int] | None = known
            self.shortest[row] = True
        else:
            closing = compiled.closing(self.ll, matcher)
            self.known[row], self.shortest[row] = closing, True
        self.signature[row] = signature
        if not closing:
            return  # complete already, or no closing found (then cut at the limit)
        if len(closing) + LOOKAHEAD_SLACK < remaining:
            return  # room to spare
        pick = picks[row]
        if pick not in self.end_ids and len(closing) < remaining:
            if pick == closing[0]:
                return  # the closing's own first token: its rest fits
            probe = matcher.deep_copy()
            if probe.consume_token(pick):
                if self._still_closing(probe, closing, pick) is not None:
                    return  # the same closing still fits after the model's token
                after = compiled.closing(self.ll, probe)
                if after is not None and len(after) <= remaining - 1:
                    # The model's own token still leaves room; if it is chosen, the search
                    # just made is the row's next known (shortest) closing.
                    self.searched[row] = (pick, after)
                    return
        self.forced[row] = deque(closing)
        _only(scores, row, closing[0])


class _Picks:
    """Each row's highest-scoring token, computed once per step and again for a row only after
    its scores were masked.

    On the CPU the argmax is numpy's: torch's CPU argmax over a 151k vocabulary took ~4 ms for
    16 rows (numpy's 0.35 ms), a sixth of a demo-model step.
    """

    def __init__(self, scores: torch.Tensor):
        self.scores = scores
        self.rows = _argmax(scores)
        self._stale: set[int] = set()

    def changed(self, rows: list[int]) -> None:
        """``rows``' scores were masked: their picks are computed again when asked."""
        self._stale.update(rows)

    def __getitem__(self, row: int) -> int:
        if row in self._stale:
            self._stale.discard(row)
            self.rows[row] = _argmax(self.scores[row:row + 1])[0]
        return self.rows[row]


def _argmax(scores: torch.Tensor) -> list[int]:
    """The index of each row's largest score (the first one on ties, as ``torch.argmax``)."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64,
                                                        torch.float16):
        return scores.detach().numpy().argmax(axis=1).tolist()
    return scores.argmax(dim=1).tolist()


def _only(scores: torch.Tensor, row: int, token: int) -> None:
    """Make ``token`` the only choice of ``row`` (whatever its logit was)."""
    scores[row].fill_(float("-inf"))
    scores[row, token] = 0.0
