"""From tokenized examples to micro-batches: data order, packing and padding.

Data order is a pure function of ``(seed, step)``: optimizer step ``k`` consumes the examples
at positions ``[k*E, (k+1)*E)`` of an endless stream made of one seeded permutation per epoch
(``E`` = examples per optimizer step). Resuming at step ``k`` therefore needs nothing but ``k``.

Packed micro-batches put several examples in one row, with position ids restarting at 0 for
each example; transformers derives a block-diagonal causal mask from those position ids, so
no example attends to another. Targets are shifted inside each example, so the last token of
one example never learns to predict the first token of the next.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

IGNORE = -100


@attrs.define(frozen=True)
class StepPlan:
    """How training data maps onto optimizer steps."""

    num_examples: int
    examples_per_step: int
    total_steps: int
    seed: int
    shuffle: bool

    # Every step of an epoch asks for the same order: compute each permutation once, not per
    # step (a frozen attrs instance is hashable, so the cache is keyed on the plan too).
    @functools.lru_cache(maxsize=2)  # noqa: B019 - plans are few and short-lived
    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.num_examples)

    def step_indices(self, step: int) -> list[int]:
        """Example indices of optimizer step ``step`` (0-based)."""
        start = step * self.examples_per_step
        out: list[int] = []
        pos = start
        end = start + self.examples_per_step
        while pos < end:
            epoch, offset = divmod(pos, self.num_examples)
            order = self.epoch_order(epoch)
            take = min(end - pos, self.num_examples - offset)
            out.extend(int(i) for i in order[offset : offset + take])
            pos += take
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.examples_per_step / self.num_examples


def plan_steps(num_examples: int, examples_per_step: int, num_epochs: float,
               max_steps: int | None, seed: int, shuffle: bool) -> StepPlan:
    if max_steps is not None:
        total = max_steps
    else:
        total = max(1, int(np.ceil(num_examples * num_epochs / examples_per_step)))
    return StepPlan(num_examples, examples_per_step, total, seed, shuffle)


def shifted_targets(labels: Sequence[int]) -> list[int]:
    """``targets[t] = labels[t + 1]``: what position ``t`` must predict, within one example."""
    return [*labels[1:], IGNORE]


def pack_greedy(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Split items (in order) into groups whose total length is at most ``budget``.

    Order is kept so the same step always packs the same way; an item longer than the budget
    gets a group of its own (the config guarantees budget >= max_length, so this is rare).
    """
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def collate_packed(examples: Sequence[dict[str, Any]], pad_to_multiple: int = 1
                   ) -> dict[str, Any]:
    """One row holding all ``examples`` back to back (no padding between them).

    ``pad_to_multiple`` > 1 appends one trailing filler segment (its own positions, targets
    ignored) so shapes repeat across steps, which compiled kernels like.
    """
    import torch

    ids: list[int] = []
    pos: list[int] = []
    tgt: list[int] = []
    for ex in examples:
        n = len(ex["input_ids"])
        ids.extend(ex["input_ids"])
        pos.extend(range(n))
        tgt.extend(shifted_targets(ex["labels"]))
    extra = (-len(ids)) % pad_to_multiple
    if extra:
        ids.extend([0] * extra)
        pos.extend(range(extra))
        tgt.extend([IGNORE] * extra)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "targets": torch.tensor([tgt], dtype=torch.long),
        "seq_lens": [len(ex["input_ids"]) for ex in examples] + ([extra] if extra else []),
        "filler": extra,
    }


def collate_padded(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded rows with an attention mask; padding is never trained."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        tgt[row, :n] = torch.tensor(shifted_targets(ex["labels"]))
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "targets": tgt}


def micro_batches(examples: Sequence[dict[str, Any]], packing: bool, batch_size: int,
                  token_budget: int, pad_id: int, pad_to_multiple: int = 1
                  ) -> list[dict[str, Any]]:
    """The micro-batches of one optimizer step."""
    if packing:
        groups = pack_greedy([len(ex["input_ids"]) for ex in examples], token_budget)
        return [collate_packed([examples[i] for i in g], pad_to_multiple) for g in groups]
    return [
        collate_padded(examples[i : i + batch_size], pad_id)
        for i in range(0, len(examples), batch_size)
    ]


def count_tokens(batches: Sequence[dict[str, Any]]) -> int:
    """Tokens of real examples in ``batches``: no padding, no filler segment."""
    total = 0
    for b in batches:
        if "attention_mask" in b:
            total += int(b["attention_mask"].sum())
        elif "seq_lens" in b:
            total += sum(b["seq_lens"]) - int(b.get("filler", 0))
        else:
            total += int(b["input_ids"].numel())
    return total


def count_trained(batches: Sequence[dict[str, Any]]) -> int:
    return int(sum(int((b["targets"] != IGNORE).sum()) for b in batches))


def split_by_tokens(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Positions ``0..len(lengths)-1`` split into ``parts`` shares of near-equal total length.

    Used to divide one optimizer step's examples across ranks: each rank's work is about its
    tokens, not its example count. Longest first, each to the share with the fewest tokens so
    far (ties: the lower share), then each share in the step's order, so packing stays stable.
    A pure function of ``lengths``: every rank computes every share the same way, and the
    global step holds the same examples whatever ``parts`` is. With at least ``parts`` items,
    no share is empty.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    shares: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        target = min(range(parts), key=lambda r: (load[r], r))
        shares[target].append(i)
        load[target] += int(lengths[i])
    return [sorted(s) for s in shares]


def count_micro_batches(lengths: Sequence[int], packing: bool, batch_size: int,
                        token_budget: int) -> int:
    """How many micro-batches :func:`micro_batches` makes of examples of these lengths."""
    if not lengths:
        return 0
    if packing:
        return len(pack_greedy(lengths, token_budget))
    return -(-len(lengths) // batch_size)


def trained_tokens(example: dict[str, Any]) -> int:
    """Trained targets of one example once collated (labels shifted by one, as batches do)."""
    return sum(1 for x in example["labels"][1:] if x != IGNORE)
