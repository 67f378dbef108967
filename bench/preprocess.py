"""Preprocessing throughput: rows/s and tokens/s, cold and cached, on synthetic conversations.

    python bench/preprocess.py [--rows 100000] [--profile plain_sft] [--kinds jsonl,parquet,csv]

Cold = transform + validate + ChatML render + tokenize with offsets + labels + write the cache.
Cached = the same call again (cache key over the rows + load from disk). Prints one table.

Then the same rows as data files (``--kinds``; ``--kinds ''`` skips this): a JSONL file, a
Parquet file and a CSV file (``messages`` as JSON text in a column), each read the way a run
reads it (``read_rows_cached``, then ``preprocess`` keyed on the rows' digest), with an empty
cache (cold) and again (cached: the file is hashed, rows and examples come from the cache).
Prints a second table; ``read`` is the cold reading and validating of the rows alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


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
    ap.add_argument("--kinds", default="jsonl,parquet,csv",
                    help="data file kinds to time through read_rows_cached (comma-separated)")
    ap.add_argument("--skip-memory", action="store_true",
                    help="only the data-file table (not the in-memory rows one)")
    args = ap.parse_args()

    from trainer_core.data.tokenizer import load_tokenizer
    from trainer_core.model.loading import quiet_hf
    from trainer_core.plugins.registry import get_profile_class

    quiet_hf()
    tok = load_tokenizer(None)
    profile = get_profile_class(args.profile).from_options({})
    rows = synthetic_rows(args.rows)
    if not args.skip_memory:
        in_memory(args, rows, profile, tok)
    kinds = [k for k in args.kinds.split(",") if k]
    if kinds:
        data_files(args, rows, profile, tok, kinds)


def in_memory(args, rows, profile, tok) -> None:
    from trainer_core.data.preprocess import preprocess

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


def write_file(kind: str, rows: list[dict], folder: str) -> str:
    records = [{k: v for k, v in r.items() if k != "_line"} for r in rows]
    path = os.path.join(folder, f"train.{kind}")
    if kind == "jsonl":
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif kind == "csv":
        with open(path, "w", encoding="utf-8", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["messages"])
            out.writerows([json.dumps(r["messages"], ensure_ascii=False)] for r in records)
    else:
        raise SystemExit(f"--kinds: unknown kind {kind!r}")
    return path


def data_files(args, rows, profile, tok, kinds) -> None:
    """Each kind of file read and preprocessed as a run does, cold and cached."""
    from trainer_core.data.preprocess import preprocess
    from trainer_core.data.rows import read_rows_cached

    def run(path: str, cache: str) -> tuple[float, float, object]:
        t0 = time.perf_counter()
        data, problems = read_rows_cached(path, cache)
        read = time.perf_counter() - t0
        assert not problems and len(data) == len(rows)
        _ds, stats = preprocess(data, profile, tok, "chatml", 2048, 42, False, cache,
                                source=path)
        return read, time.perf_counter() - t0, stats

    print(f"\ndata files, {args.rows:,} rows, read_rows_cached + preprocess:")
    print(f"{'kind':<8} {'MB':>7} {'read':>7} {'cold':>8} {'cached':>8} {'rows/s cached':>14}")
    with tempfile.TemporaryDirectory() as folder:
        for kind in kinds:
            path = write_file(kind, rows, folder)
            cache = os.path.join(folder, f"cache-{kind}")
            read, cold, stats = run(path, cache)
            assert not stats.cache_hit
            again = []
            for _ in range(args.repeats):
                _read, total, stats2 = run(path, cache)
                assert stats2.cache_hit and stats2.rows_kept == stats.rows_kept
                again.append(total)
            cached = statistics.median(again)
            mb = Path(path).stat().st_size / 1e6
            print(f"{kind:<8} {mb:7.1f} {read:7.2f} {cold:8.2f} {cached:8.3f} "
                  f"{args.rows / cached:14,.0f}")


if __name__ == "__main__":
    main()
