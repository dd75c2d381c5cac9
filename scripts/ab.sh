#!/usr/bin/env bash
# Two builds of stoa side by side: `scripts/ab.sh OLD_STOA NEW_STOA [RUNS]` runs the scenarios
# whose figures docs/PERFORMANCE.md keeps (fan-out, rooms, connects and memory per
# connection) against a fresh broker of each build in turn, alternating, RUNS times (3), with
# the same generator (target/release/stoa-cli). The broker is pinned to CPU 0 and the
# generator to CPU 1, as in scripts/bench.sh. Prints one JSON line per run, then the medians.
# For "a change must not slow the paths that do not use it": build the old commit in a
# worktree (`git worktree add /tmp/base REV && cargo build --release` there) and compare.
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1 new=$2 runs=${3:-3}
cli=target/release/stoa-cli
out=target/ab
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"

pid=""
data=""
stop() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ -n "$data" ]; then rm -rf "$data"; fi
  pid="" data=""
}
trap stop EXIT

# start BIN: a fresh broker on free ports; sets pid and http.
start() {
  data=$(mktemp -d)
  taskset -c 0 "$1" --http-listen 127.0.0.1:0 --stomp-listen 127.0.0.1:0 --data-dir "$data" > "$data.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do grep -qs listening "$data.log" && break; sleep 0.1; done
  http=$(grep -o 'http=[0-9.:]*' "$data.log" | cut -d= -f2)
  rm -f "$data.log"
}

# scenario LABEL ARGS...: one run per build, in alternating order.
scenario() {
  local label=$1; shift
  local order=("old:$old" "new:$new")
  [ $((run % 2)) -eq 0 ] && order=("new:$new" "old:$old")
  for entry in "${order[@]}"; do
    local build=${entry%%:*} bin=${entry#*:} line
    start "$bin"
    if line=$(taskset -c 1 timeout 600 "$cli" --connect-timeout 120 --url "ws://$http/ws" "$@" --pid "$pid" 2>/dev/null | tail -1) && [ -n "$line" ]; then
      python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["label"]=sys.argv[2]; d["build"]=sys.argv[3]; print(json.dumps(d))' "$line" "$label" "$build" | tee -a "$results"
    else
      echo "$build $label: FAILED" >&2
    fi
    stop
  done
}

for run in $(seq 1 "$runs"); do
  scenario fanout-100 bench fanout --subscribers 100 --messages 50000
  scenario fanout-1000 bench fanout --subscribers 1000 --messages 5000
  scenario rooms-100k bench rooms --rooms 100 --members 10 --rate 100000 --seconds 5
  scenario rooms-300k bench rooms --rooms 100 --members 10 --rate 300000 --seconds 5
  scenario conns-19000 bench conns --connections 19000
  scenario conns-19000-alone bench conns --connections 19000 --rooms 19000
done

python3 - "$results" <<'PY'
import json, statistics, sys
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
keys = ["deliveries_per_sec", "p50_ms", "p99_ms", "connects_per_sec", "broker_kib_per_connection"]
by = defaultdict(list)
for r in rows:
    by[(r["label"], r["build"])].append(r)
print("| scenario | figure | old (each run) | new (each run) | new / old (medians) |")
print("|---|---|---|---|---|")
for label in dict.fromkeys(r["label"] for r in rows):
    for key in keys:
        old = [r[key] for r in by[(label, "old")] if isinstance(r.get(key), (int, float))]
        new = [r[key] for r in by[(label, "new")] if isinstance(r.get(key), (int, float))]
        if not old or not new:
            continue
        f = lambda v: ", ".join(f"{x:,.2f}" if x < 100 else f"{x:,.0f}" for x in v)
        print(f"| {label} | {key} | {f(old)} | {f(new)} | {statistics.median(new) / statistics.median(old):.3f} |")
PY
