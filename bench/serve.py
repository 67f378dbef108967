"""``trainer serve`` under concurrent clients, against one-at-a-time generation, same run.

Serves the demo model (the tiny Qwen3 built by ``trainer_core.demo``, as a plain model folder:
plain_sft, greedy) from a ``trainer serve`` subprocess. For each level of concurrency, that
many client threads send chat requests back to back for ``--seconds`` (each request: one of the
bundled sample prompts, ``max_tokens`` tokens). Per level: requests/s, generated tokens/s
(from the responses' ``usage``), p50/p95 latency. The baseline, measured in this process while
the server is idle: ``generate()`` on one prompt at a time, for the same time, the way a
script answering requests one by one would, before the levels and again after them (the
``x tok/s`` column divides by their mean). The goal: at 16 clients, >= 3x the baseline's
tokens/s.

    python bench/serve.py [--clients 1,4,16,32] [--seconds 20] [--max-tokens 32]
                          [--device auto|cpu|cuda]

The model decides when to stop: an untrained model seldom ends its turn, so nearly every
request generates ``max_tokens`` tokens; tokens/s is what is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts() -> list[str]:
    from trainer_core.demo import sample_dataset_path

    out = []
    for line in sample_dataset_path().read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(next(m["content"] for m in row["messages"] if m["role"] == "user"))
    return out


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def level(url: str, model: str, texts: list[str], clients: int, seconds: float,
          max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            body = {"model": model, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": texts[i % len(texts)]}]}
            t0 = time.perf_counter()
            out = post(url + "/v1/chat/completions", body)
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += out["usage"]["completion_tokens"]
            i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start  # includes the requests still running at the end
    latencies.sort()
    return {"requests": len(latencies), "req_s": len(latencies) / wall,
            "tok_s": tokens[0] / wall, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def one_at_a_time(model_dir: Path, texts: list[str], seconds: float, max_tokens: int,
                  device: str) -> dict:
    """``generate()`` on one prompt at a time for ``seconds``, in a worker thread as the server
    generates: on a busy CPU, generation in the main thread was measured up to 20x slower than
    in another thread (torch's intra-op threads), which would flatter the server."""
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(
        _one_at_a_time(model_dir, texts, seconds, max_tokens, device)))
    worker.start()
    worker.join()
    return out


def _one_at_a_time(model_dir: Path, texts: list[str], seconds: float, max_tokens: int,
                   device: str) -> dict:
    import torch
    import transformers

    from trainer_core.data.chat import render_generation_prompt
    from trainer_core.data.tokenizer import load_tokenizer
    from trainer_core.generate.processors import generate

    tokenizer = load_tokenizer(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    def count(_ids, scores):  # called once per generated token: an exact count
        nonlocal tokens
        tokens += 1
        return scores

    latencies, tokens, i = [], 0, 0
    warm = render_generation_prompt([{"role": "user", "content": "warm up"}], "chatml", tokenizer)
    generate(model, tokenizer, [warm], (), 4)  # the first call pays one-time costs
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        text = render_generation_prompt([{"role": "user", "content": texts[i % len(texts)]}],
                                        "chatml", tokenizer)
        t0 = time.perf_counter()
        generate(model, tokenizer, [text], [count], max_tokens)
        latencies.append(time.perf_counter() - t0)
        i += 1
    wall = time.perf_counter() - start
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    latencies.sort()
    return {"requests": len(latencies), "req_s": len(latencies) / wall, "tok_s": tokens / wall,
            "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()

    import torch

    from trainer_core.demo import ensure_tiny_model

    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    model_dir = ensure_tiny_model()
    texts = prompts()
    print(f"trainer serve bench: demo model, {device}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, Python {platform.python_version()}; "
          f"max_tokens {args.max_tokens}, {args.seconds:.0f} s per row")
    baseline = one_at_a_time(model_dir, texts, args.seconds, args.max_tokens, device)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="serve-bench-", suffix=".log", delete=False)
    env = {**os.environ, "TRAINER_CACHE": os.environ.get("TRAINER_CACHE", "")}
    env = {k: v for k, v in env.items() if v}
    cmd = [sys.executable, "-m", "trainer_core", "serve", str(model_dir), "--port", str(port),
           "--queue-size", "256", "--max-batch", "64"]
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the server picks CUDA when it sees one
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
    try:
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    model = json.loads(r.read())["model"]
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    sys.exit(f"trainer serve did not start; see {log.name}")
                time.sleep(0.5)
        post(url + "/v1/chat/completions", {"model": model, "max_tokens": 4, "messages": [
            {"role": "user", "content": "warm up"}]})
        rows = [("one at a time, before", baseline)]
        for clients in (int(c) for c in args.clients.split(",")):
            rows.append((f"serve, {clients} client{'s' if clients > 1 else ''}",
                         level(url, model, texts, clients, args.seconds, args.max_tokens)))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # Measured again after: on a shared machine the load drifts; the ratio uses the mean.
    after = one_at_a_time(model_dir, texts, args.seconds, args.max_tokens, device)
    rows.append(("one at a time, after", after))
    base = (baseline["tok_s"] + after["tok_s"]) / 2
    print(f"{'':28} {'requests':>8} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} "
          f"{'x tok/s':>7}")
    for name, r in rows:
        print(f"{name:28} {r['requests']:8d} {r['req_s']:7.2f} {r['tok_s']:8.1f} "
              f"{r['p50']:7.2f} {r['p95']:7.2f} {r['tok_s'] / base:7.2f}")


if __name__ == "__main__":
    main()
