"""Cost of the profiles' logits processors per generation step, early vs late in a generation.

Feeds synthetic token ids step by step (batch 16, random scores 151,936 wide, the real Qwen3
tokenizer, prompts carrying emoji_think instructions) straight into the processors, as
``model.generate`` would. Two fresh processor sets are advanced (untimed) to 32 steps before
64 and before 1,024 generated tokens; then their next 32 steps are timed *interleaved* (one
step of the early set, one of the late set, ...) so that noise from other processes hits both
alike. Prints the median time per step of each window and their ratio: the processors keep
bounded per-row state, so the ratio should be ~1. A naive detector that re-decodes every
generated token each step is timed the same way, for contrast.

    python bench/processors.py [--batch 16] [--early 64] [--late 1024] [--window 32]
                               [--reps 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import time

import torch

VOCAB = 151_936


def naive_processor(tokenizer, prompt_len: int):
    """What ForceEndAfterTrigger avoids: decode the whole generated text at every step."""

    def process(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        texts = tokenizer.batch_decode(input_ids[:, prompt_len:].tolist())
        _ = [t.endswith("🛑🛑🛑") for t in texts]
        return scores

    return process


def build_inputs(tokenizer, batch: int, steps: int, trigger_rows: int, device: str, seed: int = 0):
    """Left-padded instruction prompts + ``steps`` random plain-text tokens per row; the first
    ``trigger_rows`` rows emit their instructed stop run at step 16 (and are forced after)."""
    from trainer_emoji_think.profile import Run, stop_instruction

    rng = random.Random(seed)
    prompts = [
        f"<|im_start|>user\nQuestion {i}\n\n{stop_instruction(Run('🛑', 3))}<|im_end|>\n"
        "<|im_start|>assistant\n" for i in range(batch)
    ]
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    specials = set(tokenizer.all_special_ids)
    pool = [i for i in range(1000, 150_000) if i not in specials]
    run = tokenizer.encode("\n🛑🛑🛑", add_special_tokens=False)
    rows = []
    for r in range(batch):
        gen = [rng.choice(pool) for _ in range(steps)]
        if r < trigger_rows:
            gen[16:16 + len(run)] = run
        rows.append(gen)
    ids = torch.cat([enc["input_ids"], torch.tensor(rows)], dim=1).to(device)
    return ids, enc["input_ids"].shape[1]


def step(processors, ids: torch.Tensor, length: int, scores: torch.Tensor) -> float:
    """Seconds for all ``processors`` at sequence length ``length`` (synchronised on CUDA)."""
    view = ids[:, :length]
    t0 = time.perf_counter()
    out = scores
    for p in processors:
        out = p(view, out)
    if out.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(make, ids, prompt_len, scores, early: int, late: int, window: int):
    """Per-step seconds of the windows (early - window, early] and (late - window, late]."""
    a, b = make(), make()
    for n in range(late - window):  # advance untimed: a to its window, b to its window
        if n < early - window:
            step(a, ids, prompt_len + n, scores)
        step(b, ids, prompt_len + n, scores)
    times_a, times_b = [], []
    for i in range(window):
        times_a.append(step(a, ids, prompt_len + early - window + i, scores))
        times_b.append(step(b, ids, prompt_len + late - window + i, scores))
    return times_a, times_b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--early", type=int, default=64)
    ap.add_argument("--late", type=int, default=1024)
    ap.add_argument("--window", type=int, default=32, help="timed steps per window")
    ap.add_argument("--reps", type=int, default=3, help="measurements per setup (pooled)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: bundled)")
    args = ap.parse_args()

    from trainer_emoji_think.profile import EmojiThink
    from trainer_regime3.plugin import Regime3

    from trainer_core.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(args.tokenizer)
    scores = torch.randn(args.batch, VOCAB, device=args.device)
    today = dt.date(2025, 1, 1)
    setups = [
        ("emoji_think, no row stopped", lambda: EmojiThink.from_options({}, today=today), 0),
        ("emoji_think, half the rows stopped", lambda: EmojiThink.from_options({}, today=today),
         args.batch // 2),
        ("regime3, no row stopped", lambda: Regime3.from_options({}, today=today), 0),
        ("naive re-decode (for contrast)", None, 0),
    ]
    print(f"device {args.device}, batch {args.batch}, vocab {VOCAB}, torch threads "
          f"{torch.get_num_threads()}; median ms per step over generated steps "
          f"({args.early - args.window}, {args.early}] and ({args.late - args.window}, "
          f"{args.late}], {args.reps} reps pooled")
    print(f"{'processors':<38} {'@' + str(args.early):>9} {'@' + str(args.late):>9} {'ratio':>7}")
    for label, make_profile, trigger_rows in setups:
        ids, prompt_len = build_inputs(tok, args.batch, args.late, trigger_rows, args.device)

        def make(make_profile=make_profile, prompt_len=prompt_len):
            if make_profile is None:
                return [naive_processor(tok, prompt_len)]
            return make_profile().logits_processors(tok, None)

        early_t: list[float] = []
        late_t: list[float] = []
        measure(make, ids, prompt_len, scores, args.early, args.early, 8)  # warm-up
        for _ in range(args.reps):
            a, b = measure(make, ids, prompt_len, scores, args.early, args.late, args.window)
            early_t += a
            late_t += b
        at_early = statistics.median(early_t) * 1e3
        at_late = statistics.median(late_t) * 1e3
        print(f"{label:<38} {at_early:>9.3f} {at_late:>9.3f} {at_late / at_early:>7.2f}")


if __name__ == "__main__":
    main()
