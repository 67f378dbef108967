"""Rendering conversations to text and labelling exactly the assistant turns.

Three template kinds (``model.chat_template``):

* ``chatml`` (default): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, nothing
  injected (no ``<think>`` blocks, no default system prompt).
* ``tokenizer``: the tokenizer's own Jinja ``chat_template``.
* a path to a ``.jinja`` file, rendered with the tokenizer's ``apply_chat_template``.

Labels (what the loss sees): for every assistant turn its content and the end-of-turn marker
that follows it are trained; everything else (system and user turns, role headers, the newline
after the marker, padding) is ``-100``. We find the character span of each assistant turn in the
rendered text and tokenize the whole text once with offsets, labelling a token iff its
characters overlap a trained span. This works for any template without ``{% generation %}``
tags, including templates that rewrite turns (Qwen3's own template adds an empty think block to
the last assistant turn and strips ``<think>...</think>`` from earlier ones).

This module imports neither torch nor transformers: the tokenizer is passed in.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import attrs

from trainer_core.errors import UserError

IGNORE_INDEX = -100
CHATML = "chatml"
TOKENIZER = "tokenizer"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

Message = dict[str, Any]

#: The built-in ChatML as a Jinja chat template. It is saved with a model trained on ``chatml``
#: so that any tool's ``apply_chat_template`` renders exactly what :func:`render_chatml` (and
#: :func:`render_generation_prompt`) rendered in training.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@attrs.frozen
class ChatTemplate:
    """A resolved template: ``source`` is the Jinja text, ``None`` for built-in ChatML."""

    name: str
    source: str | None = None

    @property
    def is_chatml(self) -> bool:
        return self.source is None

    @property
    def jinja(self) -> str:
        """The template as Jinja text (ChatML's equivalent for the built-in one)."""
        return CHATML_JINJA if self.source is None else self.source

    def identity(self) -> str:
        """What identifies the rendering, for cache keys."""
        return "builtin:chatml:1" if self.source is None else "jinja:" + self.source


@attrs.frozen
class Encoded:
    """One tokenized example.

    ``text`` is the rendered conversation and ``offsets[i]`` the character span of token ``i``
    in it; ``turn_ends[k]`` is the token index just past the trained span (end-of-turn marker
    included) of the k-th assistant turn.
    """

    input_ids: list[int]
    labels: list[int]
    text: str
    offsets: list[tuple[int, int]]
    turn_ends: list[int]

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def num_masked(self) -> int:
        return self.length - self.num_trained


def resolve_template(template: str | ChatTemplate, tokenizer: Any = None) -> ChatTemplate:
    """Turn a template spec (``chatml``, ``tokenizer`` or a Jinja file path) into a template.

    Raises ``UserError`` for a missing file or a tokenizer without a chat template.
    """
    if isinstance(template, ChatTemplate):
        return template
    if template == CHATML:
        return ChatTemplate(CHATML)
    if template == TOKENIZER:
        source = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if not isinstance(source, str) or not source:
            raise UserError(
                "model.chat_template: 'tokenizer' was asked for but the tokenizer has no "
                "chat_template; use 'chatml' or a path to a .jinja file"
            )
        return ChatTemplate(TOKENIZER, source)
    path = os.path.expanduser(template)
    if not os.path.isfile(path):
        raise UserError(
            f"model.chat_template: {template!r} is not 'chatml', 'tokenizer' or an existing "
            ".jinja file"
        )
    with open(path, encoding="utf-8") as fh:
        return ChatTemplate(template, fh.read())


def render_chatml(messages: Sequence[Message]) -> str:
    """Render ``messages`` as plain ChatML (no generation prompt, nothing injected)."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def render(messages: Sequence[Message], template: str | ChatTemplate, tokenizer: Any) -> str:
    """Render a whole conversation for training (no generation prompt)."""
    tpl = resolve_template(template, tokenizer)
    if tpl.is_chatml:
        return render_chatml(messages)
    return _render_jinja(list(messages), tpl, tokenizer, generation_prompt=False)


def render_generation_prompt(
    messages: Sequence[Message], template: str | ChatTemplate, tokenizer: Any
) -> str:
    """Render ``messages`` followed by the header that asks the model for an assistant turn."""
    tpl = resolve_template(template, tokenizer)
    if tpl.is_chatml:
        return render_chatml(messages) + f"{IM_START}assistant\n"
    return _render_jinja(list(messages), tpl, tokenizer, generation_prompt=True)


def _render_jinja(
    messages: list[Message], tpl: ChatTemplate, tokenizer: Any, generation_prompt: bool
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=tpl.source,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except UserError:
        raise
    except Exception as exc:  # Jinja errors (raise_exception in templates, syntax errors...)
        raise UserError(f"chat template {tpl.name!r} failed to render: {exc}") from exc
    if not isinstance(text, str):  # defensive: some versions return a list for batches
        raise UserError(f"chat template {tpl.name!r} did not render to text")
    return text


def encode(
    messages: Sequence[Message], tokenizer: Any, template: str | ChatTemplate = CHATML
) -> Encoded:
    """Render and tokenize ``messages``; label assistant content + end-of-turn markers only.

    No special tokens are added beyond what the template writes (``add_special_tokens=False``).
    Raises ``UserError`` when the template cannot render the conversation or an assistant
    turn's content cannot be found in the rendered text.
    """
    tpl = resolve_template(template, tokenizer)
    text, spans = render_with_spans(messages, tokenizer, tpl)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    labels, turn_ends = label_offsets(input_ids, offsets, len(text), spans)
    return Encoded(input_ids, labels, text, offsets, turn_ends)


def render_with_spans(
    messages: Sequence[Message], tokenizer: Any, tpl: ChatTemplate
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span (content + end-of-turn marker) of
    each assistant turn in it: the text half of :func:`encode`, before tokenization.

    Raises ``UserError`` like :func:`encode`.
    """
    if tpl.is_chatml:
        return _chatml_spans(messages)
    text = _render_jinja(list(messages), tpl, tokenizer, generation_prompt=False)
    return text, _locate_assistant_spans(list(messages), tpl, tokenizer, text)


def label_offsets(
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    text_length: int,
    spans: Sequence[tuple[int, int]],
) -> tuple[list[int], list[int]]:
    """Labels (a token is trained iff its characters overlap a span) and each span's turn end.

    The reference rule; the batched preprocessing path applies the same rule with arrays.
    """
    # A per-character mask keeps the overlap test linear and handles byte-level BPE pieces
    # of one character (multi-token emoji share the same offsets).
    mask = bytearray(text_length + 1)
    span_id = [0] * (text_length + 1)
    for k, (a, b) in enumerate(spans):
        mask[a:b] = b"\x01" * (b - a)
        span_id[a:b] = [k] * (b - a)
    labels = [IGNORE_INDEX] * len(input_ids)
    turn_ends = [0] * len(spans)
    for i, (s, e) in enumerate(offsets):
        if e > s and any(mask[s:e]):
            labels[i] = input_ids[i]
            k = max(span_id[c] for c in range(s, e) if mask[c])
            turn_ends[k] = i + 1
    # Turns whose every token was cut away would have end 0; keep ends monotonic for truncate.
    for k in range(1, len(turn_ends)):
        turn_ends[k] = max(turn_ends[k], turn_ends[k - 1])
    return labels, turn_ends


def _chatml_spans(messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in messages:
        header = f"{IM_START}{m['role']}\n"
        body = f"{m['content']}{IM_END}"
        if m["role"] == "assistant":
            start = pos + len(header)
            spans.append((start, start + len(body)))
        piece = header + body + "\n"
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), spans


_PROBE_USER = ("PROBEUSERALPHA", "PROBEUSERBETA")
_PROBE_ASSISTANT = ("PROBEASSISTANTALPHA", "PROBEASSISTANTBETA")
_markers: dict[tuple[str, int], tuple[Any, str]] = {}


def end_of_turn_marker(template: str | ChatTemplate, tokenizer: Any) -> str:
    """The text a template writes right after an assistant turn's content (e.g. ``<|im_end|>``).

    Found by rendering a two-round probe conversation: the common start of what follows each
    assistant answer, without leading whitespace and cut at the first whitespace (so the
    newline after ``<|im_end|>`` or ``<end_of_turn>`` is not part of it). Empty when the
    template writes nothing there.
    """
    tpl = resolve_template(template, tokenizer)
    if tpl.is_chatml:
        return IM_END
    key = (tpl.source or "", id(tokenizer))
    hit = _markers.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    probe = [
        {"role": "user", "content": _PROBE_USER[0]},
        {"role": "assistant", "content": _PROBE_ASSISTANT[0]},
        {"role": "user", "content": _PROBE_USER[1]},
        {"role": "assistant", "content": _PROBE_ASSISTANT[1]},
    ]
    text = _render_jinja(probe, tpl, tokenizer, generation_prompt=False)
    suffixes = []
    for content in _PROBE_ASSISTANT:
        at = text.rfind(content)
        if at < 0:
            raise UserError(
                f"chat template {tpl.name!r} does not render assistant content verbatim; "
                "cannot tell which tokens to train"
            )
        suffixes.append(text[at + len(content) :])
    common = os.path.commonprefix(suffixes).lstrip()
    marker = re.split(r"\s", common, maxsplit=1)[0] if common else ""
    _markers[key] = (tokenizer, marker)
    return marker


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: prefixes are usually long and identical.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _content_variants(content: str) -> list[str]:
    """What a template may have made of ``content``: as is, stripped, or without reasoning
    (templates such as Qwen3's drop ``<think>...</think>`` from earlier assistant turns)."""
    variants = [content, content.strip()]
    if "</think>" in content:
        answer = content.split("</think>")[-1]
        variants += [answer.lstrip("\n"), answer.strip()]
    out: list[str] = []
    for v in variants:
        if v not in out and (v or not content.strip()):
            out.append(v)
    return out


def _locate_assistant_spans(
    messages: list[Message], tpl: ChatTemplate, tokenizer: Any, full: str
) -> list[tuple[int, int]]:
    """Character spans (content + end-of-turn marker) of each assistant turn in ``full``.

    Each turn is searched for inside its own region: after everything rendered for the
    messages before it (the common prefix of ``render(messages[:i])`` and ``full``) and before
    the end of the next user/system message (same trick with a longer prefix). Requiring the
    end-of-turn marker right after the content keeps short answers (``"a"``) from matching
    inside role headers.
    """
    marker = end_of_turn_marker(tpl, tokenizer)
    tail = r"\s*" + re.escape(marker) if marker else ""
    bound_cache: dict[int, int | None] = {}

    def bound(k: int) -> int | None:
        # End of what messages[:k] render to inside ``full``; None if unknown.
        if k not in bound_cache:
            try:
                prefix = _render_jinja(messages[:k], tpl, tokenizer, generation_prompt=False)
                bound_cache[k] = _common_prefix_len(prefix, full)
            except UserError:
                bound_cache[k] = None
        return bound_cache[k]

    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        lo = cursor
        if i > 0 and messages[i - 1].get("role") != "assistant":
            lo = max(lo, bound(i) or 0)
        nxt = next((k for k in range(i + 1, len(messages)) if messages[k].get("role") != "assistant"), None)
        hi = len(full)
        if nxt is not None:
            b = bound(nxt + 1)
            if b is not None and b > lo:
                hi = b
        found = _search(full, m.get("content", ""), tail, lo, hi) or _search(
            full, m.get("content", ""), tail, lo, len(full)
        )
        if found is None:
            raise UserError(
                f"messages[{i}]: chat template {tpl.name!r} changed this assistant turn's "
                "content so it cannot be found in the rendered text; cannot tell which tokens "
                "to train (use chat_template: chatml or a template that renders content verbatim)"
            )
        spans.append(found)
        cursor = found[1]
    return spans


def _search(full: str, content: str, tail: str, lo: int, hi: int) -> tuple[int, int] | None:
    region = full[:hi]
    for variant in _content_variants(content):
        match = re.compile(re.escape(variant) + tail).search(region, lo)
        if match:
            return match.start(), match.end()
    return None


def truncate(encoded: Encoded, max_length: int) -> Encoded | None:
    """Cut ``encoded`` to at most ``max_length`` tokens at the end of an assistant turn.

    Keeps every assistant turn that fits entirely (its end-of-turn token included) and drops
    the rest; returns ``None`` when not even the first assistant turn fits. Only used when the
    user opted into truncation.
    """
    if encoded.length <= max_length:
        return encoded
    fitting = [end for end in encoded.turn_ends if 0 < end <= max_length]
    if not fitting:
        return None
    end = fitting[-1]
    text_end = encoded.offsets[end - 1][1]
    return Encoded(
        input_ids=encoded.input_ids[:end],
        labels=encoded.labels[:end],
        text=encoded.text[:text_end],
        offsets=encoded.offsets[:end],
        turn_ends=[e for e in encoded.turn_ends if e <= end],
    )
