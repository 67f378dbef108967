"""Show what the model will be trained on: rendered text with the trained tokens highlighted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer_core.data.chat import IGNORE_INDEX, ChatTemplate, Encoded, encode, resolve_template
from trainer_core.data.preprocess import prepare_row
from trainer_core.data.rows import LINE_KEY, ROW_KEY

TRAINED_ON = "\x1b[1;32m"  # bold green
TRAINED_OFF = "\x1b[0m"
OPEN_MARK = "[["
CLOSE_MARK = "]]"


def render_preview(encoded: Encoded, tokenizer: Any = None, color: bool = False) -> str:
    """The rendered text of ``encoded`` with trained spans marked, then a count line.

    Trained text is bold green with ``color=True``, else wrapped in ``[[`` ... ``]]``. Spans
    come from token character offsets, so multi-token characters (emoji) are shown whole.
    ``tokenizer`` is accepted for API symmetry; the offsets already say everything needed.
    """
    text = encoded.text
    trained = bytearray(len(text))
    for (start, end), label in zip(encoded.offsets, encoded.labels, strict=True):
        if label != IGNORE_INDEX and end > start:
            trained[start:end] = b"\x01" * (end - start)
    on, off = (TRAINED_ON, TRAINED_OFF) if color else (OPEN_MARK, CLOSE_MARK)
    out: list[str] = []
    i = 0
    while i < len(text):
        j = i
        while j < len(text) and trained[j] == trained[i]:
            j += 1
        out.append(f"{on}{text[i:j]}{off}" if trained[i] else text[i:j])
        i = j
    body = "".join(out)
    if not body.endswith("\n"):
        body += "\n"
    return body + f"trained: {encoded.num_trained} tokens, masked: {encoded.num_masked} tokens"


def preview_examples(
    rows: Sequence[dict[str, Any]],
    profile: Any,
    tokenizer: Any,
    template: str | ChatTemplate,
    n: int,
    seed: int,
    color: bool = False,
) -> str:
    """Transform, encode and render the first ``n`` rows exactly as training would see them.

    Uses the same preparation (system prompt, transform with the row's RNG, validate) as
    preprocessing, so what is shown is what gets trained.
    """
    tpl = resolve_template(template, tokenizer)
    blocks: list[str] = []
    for index, row in enumerate(rows[:n]):
        line, row_index = row.get(LINE_KEY), row.get(ROW_KEY)
        where = (f"line {line}" if line else f"row index {row_index}" if row_index is not None
                 else f"row {index + 1}")
        example, problems = prepare_row(profile, row, index, seed, where)
        title = f"=== example {index + 1}" + (f" ({where})" if line or row_index is not None
                                              else "") + " ==="
        if problems:  # training drops such rows; say so instead of rendering them
            blocks.append(title + "\n" + "dropped by the profile: " + "; ".join(problems))
            continue
        encoded = encode(example["messages"], tokenizer, tpl)
        blocks.append(title + "\n" + render_preview(encoded, tokenizer, color))
    return "\n\n".join(blocks)
