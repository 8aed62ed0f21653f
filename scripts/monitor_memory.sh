#!/usr/bin/env bash
# Does a dashboard left open grow the coordinator's memory? Starts a run with the status
# server and 2 workers, pauses it (so training does not grow anything), then polls what the
# dashboard polls (/api/status, /api/workers, /api/history) N times and prints the
# coordinator's resident memory before and after. Uses the release build (`make build`).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20000}
BIN=${BIN:-target/release}
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$dir/run.toml" <<TOML
[run]
output_dir = "out"
listen = "127.0.0.1:0"
min_workers = 2
[model]
kind = "mlp"
[training]
global_batch = 64
steps = 100000
threads = 1
[monitor]
listen = "127.0.0.1:$port"
TOML
"$BIN/coordinator" run --config "$dir/run.toml" > /dev/null 2> "$dir/coordinator.log" &
coord=$!
for _ in $(seq 300); do [ -s "$dir/out/join.txt" ] && break; sleep 0.1; done
join=$(cat "$dir/out/join.txt")
for i in 1 2; do
    "$BIN/worker" --join "$join" --max-threads 1 --data-dir /usr/share/datasets/fashion-mnist \
        --key "$dir/w$i.key" --name "w$i" --quiet &
done
sleep 10
"$BIN/coordinator" ctl --config "$dir/run.toml" pause
sleep 3
rss() { awk '/VmRSS/ { print $2 }' "/proc/$coord/status"; }
before=$(rss)
python3 - "$port" "$N" <<'PY'
import sys, urllib.request
port, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    for p in ("/api/status", "/api/workers", "/api/history"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}{p}").read()
PY
after=$(rss)
echo "coordinator resident memory: $before kB before, $after kB after $((3 * N)) requests"
"$BIN/coordinator" ctl --config "$dir/run.toml" stop > /dev/null
wait "$coord"
