#!/usr/bin/env bash
# The volunteer's install path, end to end: build the worker's wheel (maturin), pip install
# it into a fresh venv (pip resolves torch==2.11.0 from its index), then `dtrain-worker
# --join` fetches the data from a local coordinator and trains a short run on the venv's
# libtorch (no LD_LIBRARY_PATH). `make test` runs it after the cargo tests, whose
# target/debug/coordinator it uses. WHEEL_PROFILE picks the cargo profile (default dev:
# it reuses the test build; `make wheel` builds the release wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/target/wheel-test
rm -rf "$out"
mkdir -p "$out"
step() { echo "wheel-test: $*"; }

step "building the wheel"
maturin build --quiet --profile "${WHEEL_PROFILE:-dev}" -m wheel/Cargo.toml \
    --auditwheel skip --out "$out/dist"
wheel=$(ls "$out"/dist/dtrain_worker-*.whl)
step "pip install $(basename "$wheel") into a fresh venv (with torch==2.11.0)"
python3 -m venv "$out/venv"
"$out/venv/bin/pip" install --quiet --disable-pip-version-check "$wheel"
"$out/venv/bin/python" -c "import importlib.metadata as m; assert m.version('torch').split('+')[0] == '2.11.0'"
exe=$out/venv/bin/dtrain-worker
# It must run on the venv's libtorch, not the repository's.
lib=$(env -u LD_LIBRARY_PATH ldd "$exe" | awk '$1 == "libtorch_cpu.so" { print $3 }')
case "$(readlink -f "$lib")" in
    "$out"/venv/lib/python3*/site-packages/torch/lib/libtorch_cpu.so) ;;
    *)
        env -u LD_LIBRARY_PATH ldd "$exe"
        echo "wheel-test: FAILED: dtrain-worker does not load the venv's libtorch" >&2
        exit 1
        ;;
esac

step "a local coordinator and dtrain-worker --join"
mkdir -p "$out/run"
cat > "$out/run/run.toml" <<TOML
[run]
output_dir = "out"
listen = "127.0.0.1:0"
min_workers = 1

[model]
kind = "mlp"

[training]
global_batch = 64
steps = 20
threads = 1
TOML
"$root/target/debug/coordinator" run --config "$out/run/run.toml" \
    > /dev/null 2> "$out/run/coordinator.log" &
coord=$!
trap 'kill $coord 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    [ -s "$out/run/out/join.txt" ] && break
    sleep 0.1
done
join=$(cat "$out/run/out/join.txt")
env -u LD_LIBRARY_PATH -u LIBTORCH "$exe" --join "$join" --name wheel --max-threads 1 \
    --cache-dir "$out/cache" --key "$out/worker.key" 2> "$out/worker.log" || {
    tail -20 "$out/worker.log"
    echo "wheel-test: FAILED: dtrain-worker exited with an error" >&2
    exit 1
}
# The worker left: the run ends within seconds (or it never will).
for _ in $(seq 600); do
    kill -0 $coord 2>/dev/null || break
    sleep 0.1
done
if kill -0 $coord 2>/dev/null; then
    tail -20 "$out/run/coordinator.log"
    echo "wheel-test: FAILED: the coordinator did not finish after the worker left" >&2
    exit 1
fi
wait $coord
trap - EXIT
summary=$(grep '"event":"summary"' "$out/run/out/metrics.jsonl")
echo "$summary" | grep -q '"steps":20' || {
    echo "wheel-test: FAILED: the run did not finish: $summary" >&2
    exit 1
}
grep -q '"name":"wheel' "$out/run/out/metrics.jsonl"
fetched=$(grep '"event":"data_served"' "$out/run/out/metrics.jsonl" | grep -o '"bytes":[0-9]*' | cut -d: -f2)
step "ok: dtrain-worker from the wheel fetched ${fetched:-0} bytes of data and trained 20 steps"
