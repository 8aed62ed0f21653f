#!/usr/bin/env bash
# Runs every cargo-fuzz target of the workspace for $1 seconds each (default 60) and prints a
# line per target. A crash stops the script with the fuzzer's report and a reproducer under
# <crate>/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
export RUSTC_BOOTSTRAP=1
for dir in proto compression; do
    for target in $(cd "$dir" && cargo fuzz list); do
        echo "== $dir/$target for ${SECONDS_EACH}s"
        (cd "$dir" && cargo fuzz run "$target" -- -max_total_time="$SECONDS_EACH" 2>&1 | tail -n 3)
    done
done
