#!/usr/bin/env python3
"""Turns criterion's results (target/criterion) of `cargo bench -p compression` into the
README's throughput table: GB/s (1e9 bytes) of f32 input, median time, one row per codec."""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
cells = {}
for bench in root.glob("*/*/*/new/benchmark.json"):
    b = json.loads(bench.read_text())
    est = json.loads((bench.parent / "estimates.json").read_text())
    gbps = b["throughput"]["Bytes"] / est["median"]["point_estimate"]  # bytes per ns = GB/s
    n = b["group_id"].split("n")[-1]
    size = {"1048576": "1M", "26214400": "25M"}.get(n, n)
    kind = "xor delta" if b["group_id"].startswith("xor") else "codec"
    cells[(kind, b["value_str"], b["function_id"], size)] = gbps
rows = sorted({(k, v) for (k, v, _, _) in cells}, key=lambda r: (r[0] != "codec", r[1]))
cols = [(f, s) for s in ("1M", "25M") for f in ("encode", "decode", "apply")]
cols = [c for c in cols if any((k, v, c[0], c[1]) in cells for (k, v) in rows)]
print("| what | " + " | ".join(f"{f} {s}" for f, s in cols) + " |")
print("| --- |" + " --- |" * len(cols))
for k, v in rows:
    name = v if k == "codec" else f"xor delta {v}"
    vals = [cells.get((k, v, f, s)) for f, s in cols]
    print(f"| {name} | " + " | ".join("" if x is None else f"{x:.2f}" for x in vals) + " |")
