#!/usr/bin/env bash
# A real `trainer run --nproc N` end to end on GPUs: one uninterrupted run, and one stopped by
# SIGTERM after its step-10 checkpoint and resumed; prints what each did and how they compare.
# Model: the Qwen3-0.6B shape of bench/throughput.py with the bundled tokenizer; data: the
# bundled sample conversations. Usage: bench/distributed_e2e.sh LOGDIR [NPROC] [RUNDIR]
set -u
LOG=${1:?log dir}; N=${2:-2}; RUNS=${3:-/tmp/trainer-e2e}
M=${E2E_MODEL:-/tmp/qwen3-0.6b-shape-tok}
mkdir -p "$LOG" "$RUNS"
python3 - "$M" <<'PY' || exit 1
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from throughput import ensure_model
from trainer_core.data.tokenizer import load_tokenizer
load_tokenizer(None).save_pretrained(ensure_model(Path(sys.argv[1])))
PY
ARGS=(--model "$M" --max-steps 30 --save-steps 10 --batch-size 16 --grad-accum 2
      --set environment.logging_steps=5 --set monitoring.preview_steps=10
      --set monitoring.max_new_tokens=24 --set hyperparams.eval_steps=10 --quiet --json)
t=$(date +%s)
timeout 200 python3 -m trainer_core run --nproc "$N" "${ARGS[@]}" --output-dir "$RUNS/straight" \
  > "$LOG/e2e-straight.log" 2>&1
echo "straight: rc=$? in $(( $(date +%s) - t )) s"
t=$(date +%s)
python3 -m trainer_core run --nproc "$N" "${ARGS[@]}" --output-dir "$RUNS/stopped" \
  > "$LOG/e2e-stopped.log" 2>&1 &
PID=$!
for _ in $(seq 1 1500); do
  [ -d "$RUNS/stopped/checkpoints/step-000010" ] && break
  kill -0 $PID 2>/dev/null || break
  sleep 0.1
done
kill -TERM $PID; wait $PID
echo "stopped: rc=$? in $(( $(date +%s) - t )) s; status: $(cat "$RUNS/stopped/status.json" | tr -d '\n' | cut -c1-300)"
ls "$RUNS/stopped/checkpoints"
t=$(date +%s)
timeout 200 python3 -m trainer_core run --nproc "$N" "${ARGS[@]}" --output-dir "$RUNS/stopped" \
  --resume > "$LOG/e2e-resumed.log" 2>&1
echo "resumed: rc=$? in $(( $(date +%s) - t )) s"
python3 - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
runs = Path(sys.argv[1])
def metrics(d):
    return {m["step"]: m for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
a, b = metrics(runs / "straight"), metrics(runs / "stopped")
for s in sorted(a):
    if "loss" in a[s]:
        print(f"step {s}: loss straight {a[s]['loss']:.5f} resumed {b.get(s, {}).get('loss', float('nan')):.5f}"
              f" eval {a[s].get('eval_loss')} / {b.get(s, {}).get('eval_loss')}"
              f" tok/s {a[s]['tokens_per_s']:.0f}")
for name in ("straight", "stopped"):
    d = runs / name
    st = json.loads((d / "status.json").read_text())
    rj = json.loads((d / "run.json").read_text())
    print(name, "status", st.get("state"), st.get("step"), "run.json", rj.get("state"),
          "files", sorted(p.name for p in d.iterdir()))
    print(name, "previews:", len((d / "previews.jsonl").read_text().splitlines()),
          "checkpoints:", sorted(p.name for p in (d / "checkpoints").iterdir()))
wa = load_file(runs / "straight" / "model.safetensors")
wb = load_file(runs / "stopped" / "model.safetensors")
print("final weights: max |diff|", max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa),
      "max |w|", max(float(wa[k].abs().max()) for k in wa))
PY
tail -3 "$LOG/e2e-straight.log"
