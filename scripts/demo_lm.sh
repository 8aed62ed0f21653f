#!/usr/bin/env bash
# `make demo-lm`: byte-level shards of Debian's fortunes, then a coordinator and 4 workers
# (separate processes) on loopback train a small Llama-style model with DiLoCo rounds and an
# int8 uplink. The workers fetch the shards from the coordinator into empty caches. Prints the
# validation loss curve. Output in runs/demo-lm.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
OUT=runs/demo-lm
SHARDS=runs/shards/fortunes
WORKERS=${WORKERS:-4}
if [ ! -s "$SHARDS/manifest.json" ]; then
    "$BIN/coordinator" data prepare --input /usr/share/games/fortunes --skip-suffix .dat \
        --skip-suffix .u8 --tokenizer byte --out "$SHARDS" --val-fraction 0.01
fi
rm -rf "$OUT"
mkdir -p "$OUT/keys"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

"$BIN/coordinator" run --config configs/demo-lm.toml ${STEPS:+--steps "$STEPS"} >"$OUT/coordinator.out" &
coord=$!
for _ in $(seq 1 300); do [ -s "$OUT/join.txt" ] && break; sleep 0.1; done
[ -s "$OUT/join.txt" ] || { echo "coordinator did not start" >&2; exit 1; }
join=$(cat "$OUT/join.txt")
echo "join string: $join"
echo "dashboard: http://127.0.0.1:7081/ (or: $BIN/coordinator status --config configs/demo-lm.toml)"
for i in $(seq 1 "$WORKERS"); do
    "$BIN/worker" --join "$join" --threads 1 --device cpu --name "lm-$i" \
        --cache-dir "$OUT/cache-$i" --key "$OUT/keys/worker-$i.key" 2>"$OUT/worker-$i.log" &
    pids+=($!)
done
wait "$coord"
for p in "${pids[@]}"; do wait "$p" || true; done
pids=()
echo
python3 - "$OUT/metrics.jsonl" <<'PY'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1])]
start = next(e for e in events if e["event"] in ("start", "resume"))
print("== validation loss (nats per byte), runs/demo-lm/metrics.jsonl")
print(f"{'round':>6} {'inner steps':>11} {'tokens':>10} {'val loss':>9} {'val ppl':>8} {'wall s':>7}")
for e in events:
    if e["event"] == "eval":
        b = min(e["step"] * start["local_steps"], start["total_batches"])
        toks = b * start["global_batch"] * 128
        print(f"{e['step']:>6} {b:>11} {toks:>10} {e['val_loss']:>9.4f} {e['val_ppl']:>8.2f} {e['wall_s']:>7.1f}")
s = next(e for e in events if e["event"] == "summary")
print(f"== summary: {s['steps']} rounds in {s['wall_s']:.1f} s, final val loss {s['final_val_loss']:.4f}, "
      f"uplink x{s['uplink_ratio']:.1f}, {s['bytes_in']/1e6:.1f} MB in, {s['bytes_out']/1e6:.1f} MB out")
PY
