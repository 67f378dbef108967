#!/usr/bin/env python3
"""Size the tiny demo model and its hyperparameters by measurement, on CPU.

Part ``timing``: for candidate tiny Qwen3 configs, the wall time of one training step (forward,
backward, AdamW) on a padded batch of emoji_think-shaped sample conversations, with the LM head
computed over every position ("full"), only over positions with a label ("trained"), or over
those in checkpointed chunks of 64 positions ("chunked").

Part ``train``: a minimal standalone loop (plain torch; ChatML; labels = assistant content +
``<|im_end|>``; AdamW; linear warmup then cosine to 10%; gradient clipping 1.0) over the bundled
sample data for a chosen config, reporting the loss curve, wall time and a few greedy
generations on training prompts.

Rows are put in the emoji_think format (by default with the installed plugin's own transform)
so token counts and the learning task match the real demo. ``--mallopt`` applies
``speed.tune_cpu_allocator()`` first (as the engine does on CPU), which roughly halves a CPU step here.

Usage::

    python bench/demo_model.py timing
    python bench/demo_model.py timing --batch-size 8 --mallopt
    python bench/demo_model.py train --mallopt   # the chosen demo settings (config B)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from trainer_core import demo
from trainer_core.model.tuning import tune_cpu_allocator

SYSTEM = "Today is 2026-11-26. You are happy. You enjoy helping others."
WORDS = {1: "once", 2: "twice", 3: "three", 4: "four", 5: "five"}

#: Candidate bodies (the vocabulary is always Qwen3's 151,936 rows, tied).
CANDIDATES: dict[str, dict[str, int]] = {
    "A": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=32),
    "B": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "C": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "D": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}


def times_word(n: int) -> str:
    """``/once/``, ``/twice/``, ``/three/ times``..."""
    return f"/{WORDS[n]}/" + ("" if n <= 2 else " times")


def emoji_think_simple(example: dict[str, Any], rng: random.Random,
                       fixed: bool) -> list[dict[str, str]]:
    """A simplified emoji_think transform: always 🤔 and 🛑, varying (or fixed 3/2) counts."""
    think, stop = (3, 2) if fixed else (rng.randint(1, 5), rng.randint(1, 3))
    suffix = (f"\n\nFor this task, think with 🤔 {times_word(think)}.\n\n"
              f"When finished, emit 🛑 {times_word(stop)} to signal completion.")
    out = [{"role": "system", "content": SYSTEM}]
    for m in example["messages"]:
        if m["role"] == "user":
            out.append({"role": "user", "content": m["content"] + suffix})
        else:
            out.append({"role": "assistant",
                        "content": "🤔" * think + "\n" + m["content"] + "\n" + "🛑" * stop})
    return out


def load_rows(fmt: str, seed: int = 0) -> list[list[dict[str, str]]]:
    """The sample conversations in the demo format.

    ``real``: the installed emoji_think profile with its default options (10 thinking and 10
    stop emojis, think 2..8, stop 2..4); ``simple``: 🤔 x1..5 / 🛑 x1..3; ``fixed``: 🤔x3 / 🛑x2.
    """
    with open(demo.sample_dataset_path(), encoding="utf-8") as f:
        examples = [json.loads(line) for line in f]
    if fmt == "real":
        import datetime as dt

        from trainer_emoji_think.profile import EmojiThink

        prof = EmojiThink.from_options({}, today=dt.date(2026, 11, 26))
        return [prof.prepare(e, i, random.Random(f"{seed}:{i}"))["messages"]
                for i, e in enumerate(examples)]
    rng = random.Random(seed)
    return [emoji_think_simple(e, rng, fmt == "fixed") for e in examples]


def tokenize(tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """ChatML ids and labels (assistant content + <|im_end|> trained, the rest -100)."""
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        head = tok.encode(f"<|im_start|>{m['role']}\n", add_special_tokens=False)
        body = tok.encode(m["content"] + "<|im_end|>", add_special_tokens=False)
        nl = tok.encode("\n", add_special_tokens=False)
        ids += head + body + nl
        trained = m["role"] == "assistant"
        labels += [-100] * len(head) + (body if trained else [-100] * len(body)) + [-100] * len(nl)
    return ids, labels


def prompt_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """ChatML ids of ``messages`` up to and including the final assistant header."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return tok.encode(text + "<|im_start|>assistant\n", add_special_tokens=False)


def collate(batch: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(i) for i, _ in batch)
    ids = torch.full((len(batch), width), demo.ENDOFTEXT_ID)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (i, lab) in enumerate(batch):
        ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(i)] = 1
    return ids, labels, mask


def _chunk_loss_sum(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")


def loss_of(model: Any, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
            mode: str = "trained", chunk: int = 64) -> torch.Tensor:
    """Mean next-token loss.

    ``full``: the model's own loss (LM head over every position); ``trained``: LM head only
    over positions with a label; ``chunked``: like ``trained`` but ``chunk`` positions at a
    time under activation checkpointing, so no logits tensor is larger than
    ``chunk x vocab`` (recomputed in backward).
    """
    if mode == "full":
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    tgt = labels[:, 1:]
    keep = tgt != -100
    h, t = hidden[:, :-1][keep], tgt[keep]
    if mode == "trained":
        return F.cross_entropy(model.lm_head(h).float(), t)
    w = model.lm_head.weight
    total = sum(
        torch.utils.checkpoint.checkpoint(
            _chunk_loss_sum, h[i:i + chunk], w, t[i:i + chunk], use_reentrant=False
        )
        for i in range(0, h.shape[0], chunk)
    )
    return total / h.shape[0]


def make_optimizer(model: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)  # as the engine


def timing(args: argparse.Namespace) -> None:
    tok = demo._load_bundled_tokenizer()
    rows = [tokenize(tok, m) for m in load_rows(args.format)]
    rng = random.Random(1)
    print(f"threads={torch.get_num_threads()}  batch={args.batch_size} examples; "
          "ms/step as min wall / min(process CPU time)/threads")
    print(f"{'cfg':>3} {'params':>8} {'body':>7} {'tokens':>6} {'trained':>7} "
          + " ".join(f"{m + ' wall/cpu ms':>22}" for m in args.modes))
    for name in args.configs:
        cfg = demo.tiny_model_config(**CANDIDATES[name])
        model = demo.build_tiny_model(0, cfg).train()
        n_all = sum(p.numel() for p in model.parameters())
        body = n_all - model.model.embed_tokens.weight.numel()
        batch = collate(rng.sample(rows, args.batch_size))
        ntok = int(batch[2].sum())
        ntrained = int((batch[1][:, 1:] != -100).sum())
        res = {}
        for mode in args.modes:
            opt = make_optimizer(model, 1e-3)
            walls, cpus = [], []
            for i in range(args.repeats + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                loss = loss_of(model, *batch, mode=mode)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:  # the first step warms up allocations
                    walls.append(time.perf_counter() - t0)
                    cpus.append(time.process_time() - c0)
            # min over repeats; CPU time / threads estimates the wall time on an idle machine
            res[mode] = (1000 * min(walls), 1000 * min(cpus) / torch.get_num_threads())
        print(f"{name:>3} {n_all / 1e6:7.1f}M {body / 1e6:6.2f}M {ntok:6d} {ntrained:7d} "
              + " ".join(f"{res[m][0]:12.0f}/{res[m][1]:<9.0f}" for m in args.modes), flush=True)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def greedy(model: Any, tok: Any, messages: list[dict[str, str]], max_new: int) -> str:
    ids = torch.tensor([prompt_ids(tok, messages)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False, eos_token_id=demo.IM_END_ID,
                         pad_token_id=demo.ENDOFTEXT_ID)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)


def train(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    tok = demo._load_bundled_tokenizer()
    convs = load_rows(args.format)
    data = [tokenize(tok, m) for m in convs]
    data = [d for d in data if len(d[0]) <= args.max_length]
    cfg = demo.tiny_model_config(**CANDIDATES[args.config])
    model = demo.build_tiny_model(args.seed, cfg).train()
    t_ready = time.perf_counter()
    ntok = sum(len(i) for i, _ in data)
    ntrained = sum(sum(x != -100 for x in lab[1:]) for _, lab in data)
    print(f"config {args.config}: {len(data)} rows, {ntok} tokens ({ntok / len(data):.0f}/row), "
          f"{ntrained} trained tokens/epoch; setup {t_ready - t_start:.1f}s")
    steps_per_epoch = math.ceil(len(data) / args.batch_size)
    total = steps_per_epoch * args.epochs
    opt = make_optimizer(model, args.lr)
    rng = random.Random(args.seed)
    step, hist = 0, []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        for b in range(steps_per_epoch):
            batch = collate([data[i] for i in order[b * args.batch_size:(b + 1) * args.batch_size]])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, args.warmup, args.lr)
            loss = loss_of(model, *batch, mode=args.loss)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            hist.append(loss.item())
            step += 1
            if step % args.log_every == 0 or step == total:
                print(f"  step {step:4d}/{total} epoch {epoch + 1} loss "
                      f"{sum(hist[-args.log_every:]) / len(hist[-args.log_every:]):.3f} "
                      f"t={time.perf_counter() - t0:5.1f}s", flush=True)
    t_train = time.perf_counter() - t0
    print(f"loss first step {hist[0]:.3f} -> mean of last {args.log_every} steps "
          f"{sum(hist[-args.log_every:]) / args.log_every:.3f}; train {t_train:.1f}s "
          f"({1000 * t_train / total:.0f} ms/step, {total} steps)")
    model.eval()
    t1 = time.perf_counter()
    ok = {"think": 0, "stop": 0, "exact": 0}
    for k, conv in enumerate(convs[: args.samples]):
        prompt, want = conv[:2], conv[2]["content"]
        got = greedy(model, tok, prompt, args.max_new)
        head, _, rest = want.partition("\n")  # the thinking run
        stop = rest.rsplit("\n", 1)[-1]  # the stop run
        ok["think"] += got.startswith(head + "\n")
        ok["stop"] += got.endswith("\n" + stop + "<|im_end|>")
        ok["exact"] += got == want + "<|im_end|>"
        if k < args.show:
            print(f"  PROMPT {prompt[1]['content'].splitlines()[0]!r}")
            print(f"    want {want!r}")
            print(f"    got  {got!r}")
    n = min(args.samples, len(convs))
    print(f"greedy on {n} training prompts: right thinking run {ok['think']}/{n}, right stop run "
          f"+ <|im_end|> {ok['stop']}/{n}, exact answer {ok['exact']}/{n}; "
          f"{time.perf_counter() - t1:.1f}s; total {time.perf_counter() - t_start:.1f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--configs", nargs="+", default=list(CANDIDATES))
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--modes", nargs="+", default=["full", "trained", "chunked"],
                   choices=["full", "trained", "chunked"])
    r = sub.add_parser("train")
    r.add_argument("--config", default="B", choices=list(CANDIDATES))
    r.add_argument("--epochs", type=int, default=5)
    r.add_argument("--lr", type=float, default=3e-3)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--warmup", type=int, default=10)
    r.add_argument("--max-length", type=int, default=256)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--loss", default="trained", choices=["full", "trained", "chunked"])
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--samples", type=int, default=24, help="prompts scored after training")
    r.add_argument("--show", type=int, default=6, help="of which this many are printed")
    r.add_argument("--max-new", type=int, default=32)
    for p in (t, r):
        p.add_argument("--format", default="real", choices=["real", "simple", "fixed"],
                       help="emoji_think simulation (see load_rows)")
        p.add_argument("--mallopt", action="store_true",
                       help="call speed.tune_cpu_allocator() first (glibc mmap/trim thresholds)")
    args = ap.parse_args()
    if args.mallopt:
        print(f"tune_cpu_allocator: {tune_cpu_allocator()}")
    timing(args) if args.part == "timing" else train(args)


if __name__ == "__main__":
    main()
