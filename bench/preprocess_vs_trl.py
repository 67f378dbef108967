"""Preprocessing side by side: trainer cold, trainer cached, TRL's SFTTrainer, whole processes.

    python bench/preprocess_vs_trl.py [--rows 20000] [--cached-rows 100000] [--repeats 3]
        [--trl-python /tmp/trlvenv/bin/python] [--workdir DIR] [--variants ...]

Data: a generated chat file (``--rows`` rows, ~420 tokens a row as in issue 12's file: English-like sentences, 30%
with a system prompt, 30% with 2-3 rounds, some code blocks and emoji), written once into
``--workdir``. Every variant runs as its own process (``python`` start-up and imports included)
on that same file, one after another, ``--repeats`` times in turn; the table shows medians.

Variants:
  trainer_cold      the calls ``trainer run`` makes to get its data, in its order, until the
                    step plan (what it does besides - output directory, model directory - is
                    left out): read + validate the rows (``load_rows``), load and check the
                    tokenizer, preprocess (plain_sft, ChatML, max_length 2048, assistant turns
                    trained, everything else masked) and get the training examples
                    (``prepare_examples``), plan the steps. The data cache (``data.cache_dir``:
                    rows and preprocessing) is empty; the tokenizer was loaded before (its facts
                    and saved Rust state in the bench's ``TRAINER_CACHE``), as for any run after
                    the first with that tokenizer.
  trainer_first     trainer_cold with an empty ``TRAINER_CACHE`` too: the first run ever with
                    this tokenizer (transformers loads it).
  trainer_cold_tpl  trainer_cold with ``chat_template: tokenizer`` (Qwen3's own Jinja template,
                    the one TRL renders).
  trainer_cached    trainer_cold again: the cache entries of the cold run are reused.
  trainer_100k      the cached run on ``--cached-rows`` short synthetic rows (the rows of
                    bench/preprocess.py); the cold run that fills its cache is not timed.
                    "Ready" = the training examples and the step plan exist.
  trl               TRL ``SFTTrainer(..., train_dataset=...)`` construction, which prepares the
                    dataset: ``datasets.load_dataset("json")``, TRL's training version of the
                    Qwen3 chat template (``qwen3_training.jinja``, with ``{% generation %}``
                    markers; set on the tokenizer, as TRL does not recognise the bundled one
                    to patch it), tokenize, labels,
                    truncation to 2048. ``SFTConfig(assistant_only_loss=True)`` - the closest TRL
                    has to trainer's masking (only assistant turns trained) - and
                    ``dataset_num_proc=2``; an empty ``HF_DATASETS_CACHE`` each time (cold). The
                    model is a 2-layer Qwen3 built from a config (not timed apart: construction
                    takes well under a second). Skipped, with a message, without ``--trl-python``
                    (a Python with ``trl`` installed, kept out of the project's venv).

tokens/s = the tokens the variant produced / its process wall time. CPU s = user + system time of
the process and its workers (less sensitive than wall time to other load on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QWEN3_VOCAB = 151_936  # embedding rows of Qwen3 models (check_tokenizer compares with it)

WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or by one "
    "had not but what all were when we there can an your which their said if do will each about "
    "how up out them then she many some so these would other into has more her two like him see "
    "time could no make than first been its who now people my made over did down only way find "
    "use may water long little very after words called just where most know get through back "
    "much before go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take why "
    "things help put years different away again off went old number great tell men say small "
    "every found still between name should home big give air line set own under read last never "
    "us left end along while might next sound below saw something thought both few those always "
    "looked show large often together asked house don't world going want school important until "
    "form food keep children feet land side without boy once animals life enough took sometimes "
    "four head above kind began almost live page got earth need far hand high year mother light "
    "country father let night following picture being study second eyes soon times story boys "
    "since white days ever paper hard near sentence better best across during today others "
    "however sure means knew it's try told young miles sun ways thing whole hear example heard "
    "several change answer room sea against top turned learn point city play toward five using "
    "himself usually kilometres Paris café naïve résumé"
).split()


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` generated conversations (see the module docstring)."""
    rng = random.Random(seed)

    def sentence() -> str:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 18)))
        if rng.random() < 0.3:
            s += f" {rng.randint(0, 100000)}"
        return s[0].upper() + s[1:] + rng.choice(".?!.")

    def paragraph(lo: int, hi: int) -> str:
        return " ".join(sentence() for _ in range(rng.randint(lo, hi)))

    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system",
                             "content": "You are a helpful assistant. " + sentence()})
        for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 3)):
            messages.append({"role": "user", "content": paragraph(2, 6)})
            answer = "\n\n".join(paragraph(3, 7) for _ in range(rng.randint(2, 5)))
            if rng.random() < 0.1:
                answer += "\n\n```python\nfor i in range(10):\n    print(i * 2)\n```"
            if rng.random() < 0.05:
                answer += " 🎉"
            messages.append({"role": "assistant", "content": answer})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ children (one per process)


def child_trainer(data: str, cache: str, template: str) -> None:
    t0 = time.perf_counter()
    # The calls `trainer run` makes to get its data (train/recipe.py), in the same order; what
    # it does besides (output directory, model directory) is left out.
    from trainer_core.config import load_config
    from trainer_core.data.batching import plan_steps
    from trainer_core.data.tokenizer import check_tokenizer, load_tokenizer
    from trainer_core.model.loading import quiet_hf
    from trainer_core.plugins.registry import build_profile, check_report_to
    from trainer_core.train.inputs import load_rows, prepare_examples

    t_import = time.perf_counter()
    cfg = load_config(overrides={"data.dataset": data, "data.cache_dir": cache,
                                 "data.validation_split": 0, "model.chat_template": template,
                                 "hyperparams.max_length": 2048})
    profile = build_profile(cfg)
    check_report_to(cfg)
    train_rows, val_rows, skipped = load_rows(cfg)
    t_rows = time.perf_counter()
    quiet_hf()
    tok = load_tokenizer(None)
    check_tokenizer(tok, QWEN3_VOCAB, cfg.model.chat_template == "chatml")
    t_tok = time.perf_counter()
    train, _val, stats = prepare_examples(cfg, profile, tok, train_rows, val_rows, skipped)
    hp = cfg.hyperparams
    plan = plan_steps(len(train), hp.batch_size * hp.gradient_accumulation, hp.num_epochs,
                      hp.max_steps, cfg.data.seed, cfg.data.shuffle)
    first, last = train[0], train[len(train) - 1]  # the examples are usable
    assert first["input_ids"] and last["labels"] and plan.total_steps
    t_end = time.perf_counter()
    s = stats["train"]
    print(json.dumps({"tokens": s["total_tokens"], "trained": s["trained_tokens"],
                      "rows": s["rows_kept"], "cache_hit": s["cache_hit"],
                      "imports": t_import - t0, "rows_s": t_rows - t_import,
                      "tokenizer_s": t_tok - t_rows, "prepare_s": t_end - t_tok,
                      "torch_imported": "torch" in sys.modules}))


def child_tokenizer() -> None:
    from trainer_core.data.tokenizer import load_tokenizer

    load_tokenizer(None)
    print("{}")


def child_trl(data: str, tokenizer_dir: str, out: str) -> None:
    t0 = time.perf_counter()
    import datasets
    import transformers
    import trl
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    t_import = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    # The bundled Qwen3 template is not one TRL recognises to patch; give it TRL's own
    # training version of Qwen3's template (with {% generation %} markers).
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates"
                         / "qwen3_training.jinja").read_text(encoding="utf-8")
    ds = datasets.load_dataset("json", data_files=data, split="train")
    config = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32)
    model = Qwen3ForCausalLM(config)
    args = SFTConfig(output_dir=out, assistant_only_loss=True, max_length=2048,
                     dataset_num_proc=2, report_to="none", use_cpu=True)
    t_setup = time.perf_counter()
    sft = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    t_end = time.perf_counter()
    prepared = sft.train_dataset
    lengths = [len(x) for x in prepared["input_ids"]]
    trained = sum(sum(1 for t in labels if t != -100) for labels in prepared["labels"]) \
        if "labels" in prepared.column_names else None
    print(json.dumps({"tokens": sum(lengths), "trained": trained, "rows": len(lengths),
                      "trl": trl.__version__, "transformers": transformers.__version__,
                      "imports": t_import - t0, "setup_s": t_setup - t_import,
                      "prepare_s": t_end - t_setup}))


# ------------------------------------------------------------------ parent


def run_child(argv: list[str], env: dict[str, str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}... failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    result["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--cached-rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trl-python", default=None, help="a Python with trl installed")
    ap.add_argument("--workdir", default=None, help="keep data files here (default: a temp dir)")
    ap.add_argument("--variants",
                    default="trainer_cold,trainer_first,trainer_cached,trainer_100k,trl",
                    help="comma-separated; also: trainer_cold_tpl")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        {"trainer": child_trainer, "trl": child_trl, "tokenizer": child_tokenizer}[kind](*rest)
        return

    variants = args.variants.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"chat-{args.rows}.jsonl"
    if not data.is_file():
        write_jsonl(data, chat_rows(args.rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true",
           "TRAINER_CACHE": str(work / "trainer-cache")}
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    run_child([*me, "tokenizer"], env)  # the tokenizer known (see trainer_cold)

    trl_python = args.trl_python
    if "trl" in variants:
        ok = trl_python and subprocess.run([trl_python, "-c", "import trl"],
                                           capture_output=True).returncode == 0
        if not ok:
            print(f"TRL skipped: {trl_python or 'no --trl-python given'} cannot import trl "
                  "(pip install trl into a separate venv and pass its python)")
            variants.remove("trl")
    from trainer_core.data.tokenizer import bundled_tokenizer_dir

    tok_dir = str(bundled_tokenizer_dir())

    big = work / f"short-{args.cached_rows}.jsonl"
    big_cache = work / "cache-100k"
    if "trainer_100k" in variants:
        if not big.is_file():
            sys.path.insert(0, str(HERE))
            from preprocess import synthetic_rows  # bench/preprocess.py's short rows

            rows = synthetic_rows(args.cached_rows)
            for r in rows:
                r.pop("_line", None)
            write_jsonl(big, rows)
        run_child([*me, "trainer", str(big), str(big_cache), "chatml"], env)  # fill the cache

    results: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        cache = work / f"cache-{rep}"
        shutil.rmtree(cache, ignore_errors=True)
        for v in variants:
            if v == "trainer_cold":
                r = run_child([*me, "trainer", str(data), str(cache), "chatml"], env)
                assert not r["cache_hit"]
            elif v == "trainer_first":
                first = work / f"first-{rep}"
                shutil.rmtree(first, ignore_errors=True)
                r = run_child([*me, "trainer", str(data), str(first / "data"), "chatml"],
                              {**env, "TRAINER_CACHE": str(first / "trainer")})
                assert not r["cache_hit"]
                shutil.rmtree(first, ignore_errors=True)
            elif v == "trainer_cold_tpl":
                tpl_cache = work / f"cache-tpl-{rep}"
                shutil.rmtree(tpl_cache, ignore_errors=True)
                r = run_child([*me, "trainer", str(data), str(tpl_cache), "tokenizer"], env)
                assert not r["cache_hit"]
            elif v == "trainer_cached":
                if not (cache.is_dir() and any(cache.iterdir())):
                    run_child([*me, "trainer", str(data), str(cache), "chatml"], env)
                r = run_child([*me, "trainer", str(data), str(cache), "chatml"], env)
                assert r["cache_hit"]
            elif v == "trainer_100k":
                r = run_child([*me, "trainer", str(big), str(big_cache), "chatml"], env)
                assert r["cache_hit"]
            else:
                hf_cache = Path(tempfile.mkdtemp(prefix="hfds-", dir=work))
                out = Path(tempfile.mkdtemp(prefix="trl-out-", dir=work))
                r = run_child([trl_python, str(Path(__file__).resolve()), "--child", "trl",
                               str(data), tok_dir, str(out)],
                              {**env, "HF_DATASETS_CACHE": str(hf_cache)})
                shutil.rmtree(hf_cache, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
            results[v].append(r)
            print(f"  repeat {rep + 1} {v:<16} {r['wall']:7.2f} s wall {r['cpu']:7.2f} s CPU",
                  file=sys.stderr, flush=True)
    report(results, args, data)


def report(results: dict[str, list[dict]], args: argparse.Namespace, data: Path) -> None:
    import platform

    def med(v: str, key: str) -> float:
        return statistics.median(r[key] for r in results[v])

    load = os.getloadavg()[0]
    print(f"\n{data.name}: {args.rows:,} rows; python {platform.python_version()}; "
          f"{os.cpu_count()} CPUs; load average {load:.1f} at the end; medians of "
          f"{args.repeats} repeat(s)")
    if "trl" in results:
        r = results["trl"][0]
        print(f"TRL {r['trl']}, transformers {r['transformers']} (separate venv)")
    print(f"{'variant':<17} {'rows':>8} {'tokens':>11} {'wall s':>8} {'CPU s':>8} "
          f"{'tokens/s':>11} {'inside: prepare s':>18}")
    for v in results:
        rows, tokens = results[v][0]["rows"], results[v][0]["tokens"]
        wall = med(v, "wall")
        print(f"{v:<17} {rows:>8,} {tokens:>11,} {wall:8.2f} {med(v, 'cpu'):8.2f} "
              f"{tokens / wall:11,.0f} {med(v, 'prepare_s'):18.2f}")
    if "trl" in results:
        for v in ("trainer_cold", "trainer_first", "trainer_cold_tpl"):
            if v in results:
                walls = [t["wall"] / c["wall"] for t, c in zip(results["trl"], results[v],
                                                                strict=True)]
                rate = (results[v][0]["tokens"] / med(v, "wall")) / \
                    (results["trl"][0]["tokens"] / med("trl", "wall"))
                print(f"{v} vs trl: {statistics.median(walls):.2f}x less wall time (median "
                      f"of per-repeat ratios), {rate:.2f}x the tokens/s, "
                      f"{med('trl', 'cpu') / med(v, 'cpu'):.2f}x less CPU time")
    for v in ("trainer_cached", "trainer_100k"):
        if v in results:
            r = results[v]
            print(f"{v}: start-up+imports {statistics.median(x['imports'] for x in r):.2f} s, "
                  f"rows {statistics.median(x['rows_s'] for x in r):.2f} s, tokenizer "
                  f"{statistics.median(x['tokenizer_s'] for x in r):.2f} s, cache + examples "
                  f"{statistics.median(x['prepare_s'] for x in r):.2f} s")


if __name__ == "__main__":
    main()
