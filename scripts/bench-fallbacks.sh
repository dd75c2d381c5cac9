#!/usr/bin/env bash
# What each technique costs (issue #17): the same rooms scenario (100 rooms of 10 members)
# over STOMP on WebSocket, STOMP on SockJS xhr-streaming, and Stoa's HTTP room API read by
# Server-Sent Events, long polling and polling at 1 s (writing by POST), in one run: latency
# p50/p99, bytes on the wire, HTTP requests and broker CPU per delivered message, at a
# chat-like rate (each member says something every 5 s: 2,000 deliveries/s), at 50,000
# deliveries/s for all, and at the highest rate each sustains (--step: p99 under 50 ms, or under 1,100 ms for 1 s polling,
# nothing lost). Then the broker's memory per idle reader: 5,000 WebSocket members, SSE
# streams and long polls. The broker is pinned to CPU 0, the generator to CPU 1; each
# technique gets a fresh broker.
# `scripts/bench-fallbacks.sh [RUNS]`; writes target/bench/fallbacks.jsonl,
# docs/fallbacks.svg and the fallbacks section of docs/PERFORMANCE.md. bench.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-${RUNS:-1}}
out=target/bench
mkdir -p "$out"
results="$out/fallbacks.jsonl"
: > "$results"
. scripts/bench-lib.sh

# run LABEL ARGS...: one scenario; its JSON line, tagged.
run() {
  local label=$1 line; shift
  if line=$(taskset -c 1 timeout 900 "$cli" --connect-timeout 120 "$@" 2>/dev/null | tail -1) && [ -n "$line" ]; then
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["label"]=sys.argv[2]; d["target"]="stoa"; print(json.dumps(d))' "$line" "$label" >> "$results"
    echo "   $label: ok"
  else
    echo "   $label: FAILED" >&2
  fi
}

for n in $(seq 1 "$runs"); do
  echo "==> fallbacks, run $n of $runs"
  for technique in ws sockjs-xhr-streaming sse long-poll poll; do
    limit=50
    [ "$technique" = poll ] && limit=1100
    start "$out/stoa-fallback-$technique.log"
    run "chat-$technique" --url "ws://$http/ws" bench rooms --transport "$technique" \
      --rooms 100 --members 10 --rate 2000 --seconds 10 --pid "$pid"
    # Busy: the same 50,000 deliveries/s for every technique (each sustains more), where a
    # delivery's CPU and bytes are not drowned in the broker's fixed costs of an idle second.
    run "busy-$technique" --url "ws://$http/ws" bench rooms --transport "$technique" \
      --rooms 100 --members 10 --rate 50000 --seconds 5 --p99-limit-ms "$limit" --pid "$pid"
    run "highest-$technique" --url "ws://$http/ws" bench rooms --transport "$technique" \
      --rooms 100 --members 10 --rate 5000 --seconds 3 --step --p99-limit-ms "$limit" --pid "$pid"
    stop "$pid"
  done
  for technique in ws sse long-poll; do
    start "$out/stoa-idle-$technique.log"
    run "idle-$technique" --url "ws://$http/ws" bench conns --transport "$technique" \
      --connections 5000 --parallel 64 --pid "$pid"
    stop "$pid"
  done
done
python3 scripts/fallbacks_report.py "$results" docs/fallbacks.svg docs/PERFORMANCE.md
