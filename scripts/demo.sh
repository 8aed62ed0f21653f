#!/usr/bin/env bash
# The main job: a coordinator and 4 workers (separate processes) on loopback train the CNN on
# Fashion-MNIST for 2 epochs. The workers start as a volunteer's does: no data folder and an
# empty cache each, so they download the training set from the coordinator (verified group by
# group) before they train. Output in runs/demo: metrics.jsonl, checkpoint.bin,
# model.safetensors, and the processes' logs.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
OUT=runs/demo
WORKERS=${WORKERS:-4}
rm -rf "$OUT"
mkdir -p "$OUT/keys"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# STEPS=N shortens the run (e.g. to time steps); unset: the full 2 epochs.
"$BIN/coordinator" run --config configs/demo.toml ${STEPS:+--steps "$STEPS"} >"$OUT/coordinator.out" &
coord=$!
for _ in $(seq 1 300); do [ -s "$OUT/join.txt" ] && break; sleep 0.1; done
[ -s "$OUT/join.txt" ] || { echo "coordinator did not start" >&2; exit 1; }
join=$(cat "$OUT/join.txt")
echo "join string: $join"
echo "dashboard: http://127.0.0.1:7080/ (or: $BIN/coordinator status --config configs/demo.toml)"
for i in $(seq 1 "$WORKERS"); do
    "$BIN/worker" --join "$join" --threads 1 --device cpu --name "demo-$i" \
        --key "$OUT/keys/worker-$i.key" --cache-dir "$OUT/cache-$i" 2>"$OUT/worker-$i.log" &
    pids+=($!)
done
wait "$coord"
for p in "${pids[@]}"; do wait "$p" || true; done
pids=()
echo
echo "== evaluations (runs/demo/metrics.jsonl)"
grep '"event":"eval"' "$OUT/metrics.jsonl"
echo "== data served to the workers"
grep '"event":"data_served"' "$OUT/metrics.jsonl" || true
echo "== summary"
grep '"event":"summary"' "$OUT/metrics.jsonl"
python3 - "$OUT/metrics.jsonl" <<'PY'
import json, sys
steps = [e for e in map(json.loads, open(sys.argv[1])) if e["event"] == "step"]
ms = sorted(e["step_ms"] for e in steps[len(steps) // 10:])
if ms:
    print(f"median step time {ms[len(ms) // 2]:.1f} ms over {len(ms)} steps (first 10% skipped)")
PY
