"""Preprocessing throughput: rows/s and tokens/s, cold and cached, on synthetic conversations.

    python bench/preprocess.py [--rows 100000] [--profile plain_sft]

Cold = transform + validate + ChatML render + tokenize with offsets + labels + write the cache.
Cached = the same call again (cache key over the rows + load from disk). Prints one table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ("alpha beta gamma delta the of and to in is what how many convert capital city "
             "number sum product kilometres metres grams hours minutes answer").split()
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "?"
        a = " ".join(rng.choice(words) for _ in range(rng.randint(5, 80))) + "."
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 5 == 0:  # some multi-turn rows
            msgs += [{"role": "user", "content": "And then?"},
                     {"role": "assistant", "content": a[: len(a) // 2]}]
        rows.append({"messages": msgs, "_line": i + 1})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--profile", default="plain_sft")
    ap.add_argument("--repeats", type=int, default=3, help="cached-load repeats (median)")
    args = ap.parse_args()

    from trainer_core.data.preprocess import preprocess
    from trainer_core.data.tokenizer import load_tokenizer
    from trainer_core.model.loading import quiet_hf
    from trainer_core.plugins.registry import get_profile_class

    quiet_hf()
    tok = load_tokenizer(None)
    profile = get_profile_class(args.profile).from_options({})
    rows = synthetic_rows(args.rows)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        ds, stats = preprocess(rows, profile, tok, "chatml", 2048, 42, False, cache)
        cold = time.perf_counter() - t0
        assert not stats.cache_hit
        warm = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ds2, stats2 = preprocess(rows, profile, tok, "chatml", 2048, 42, False, cache)
            warm.append(time.perf_counter() - t0)
            assert stats2.cache_hit and len(ds2) == len(ds)
    cached = statistics.median(warm)
    tokens = stats.total_tokens
    print(f"python {sys.version.split()[0]}, profile {args.profile}, {args.rows:,} rows, "
          f"{tokens:,} tokens ({stats.trained_tokens:,} trained)")
    print(f"{'path':<8} {'seconds':>9} {'rows/s':>12} {'tokens/s':>14}")
    for name, secs in (("cold", cold), ("cached", cached)):
        print(f"{name:<8} {secs:9.2f} {args.rows / secs:12,.0f} {tokens / secs:14,.0f}")
    print(f"cached speed-up: {cold / cached:.1f}x (median of {args.repeats})")


if __name__ == "__main__":
    main()
