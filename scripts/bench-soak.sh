#!/usr/bin/env bash
# The soak (issue #18): `stoa-cli bench soak` for SECONDS (1,200 by default) against a fresh
# release stoa pinned to CPU 0 (the generator on CPU 1), at a rate that keeps the broker
# about half busy: 100 rooms of 10, 5,000 room messages a second (50,000 deliveries), with
# typing, direct messages, members leaving and rejoining and connections dropped and made
# again. Writes target/bench/soak.json, docs/soak.svg (RSS and descriptors over time) and
# the soak section of docs/PERFORMANCE.md. `scripts/bench-soak.sh [SECONDS]`; bench.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-${SOAK_SECONDS:-1200}}
out=target/bench
mkdir -p "$out"
. scripts/bench-lib.sh
start "$out/stoa-soak.log"
taskset -c 1 timeout $((seconds + 300)) "$cli" --connect-timeout 120 --url "ws://$http/ws" \
  bench soak --seconds "$seconds" --rooms 100 --members 10 --rate 5000 --pid "$pid" 2> "$out/soak.log" | tail -1 > "$out/soak.json"
python3 scripts/soak_report.py "$out/soak.json" docs/soak.svg docs/PERFORMANCE.md
