#!/usr/bin/env bash
# Several nodes (issue #16), side by side with one node in the same run: two stoa nodes
# sharing one redis-server, all three pinned to CPU 0 (the server side gets the one core a
# single node gets), the load generator on CPU 1. Fan-out: the publisher on node a,
# subscribers alternating a, b. Rooms: members alternating a, b, so every room spans both.
# Each run also counts Redis's commands (INFO commandstats) per message published.
# `scripts/bench-cluster.sh [RUNS]`; writes target/bench/cluster.jsonl and prints a table.
# scripts/bench.sh runs it too and folds its lines into docs/PERFORMANCE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-${RUNS:-3}}
out=target/bench
mkdir -p "$out"
results="$out/cluster.jsonl"
: > "$results"
. scripts/bench-lib.sh

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
taskset -c 0 redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no --daemonize no > "$out/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done

start "$out/stoa-one-node.log"; one=$pid one_url="ws://$http/ws"
start "$out/stoa-node-a.log" --cluster "redis://127.0.0.1:$redis_port" --node-name bench-a; node_a=$pid a_url="ws://$http/ws"
start "$out/stoa-node-b.log" --cluster "redis://127.0.0.1:$redis_port" --node-name bench-b; b_url="ws://$http/ws"

redis_calls() { redis-cli -p "$redis_port" info commandstats | awk -F'[=,]' '/^cmdstat_/ { n += $2 } END { print n + 0 }'; }

# run LABEL TARGET ARGS...: one scenario; its JSON line, tagged, with Redis's commands.
run() {
  local label=$1 target=$2 before after line; shift 2
  before=$(redis_calls)
  if line=$(taskset -c 1 timeout 600 "$cli" --connect-timeout 120 "$@" 2>/dev/null | tail -1) && [ -n "$line" ]; then
    after=$(redis_calls)
    python3 - "$line" "$label" "$target" "$before" "$after" >> "$results" <<'PY'
import json, sys
d = json.loads(sys.argv[1]); d["label"], d["target"] = sys.argv[2], sys.argv[3]
if d["target"] == "stoa-2-nodes":
    d["redis_commands"] = int(sys.argv[5]) - int(sys.argv[4])
    sent = d.get("messages") or (d.get("steps") or [{}])[-1].get("messages_sent")
    d["redis_commands_per_publish"] = d["redis_commands"] / sent if sent else None
print(json.dumps(d))
PY
    echo "   $target $label: ok"
  else
    echo "   $target $label: FAILED" >&2
  fi
}

for n in $(seq 1 "$runs"); do
  echo "==> several nodes, run $n of $runs"
  run fanout-1000-one-node stoa --url "$one_url" bench fanout --subscribers 1000 --messages 5000 --pid "$one"
  run fanout-1000-two-nodes stoa-2-nodes --url "$a_url,$b_url" bench fanout --subscribers 1000 --messages 5000 --pid "$node_a"
  run rooms-10k-one-node stoa --url "$one_url" bench rooms --rooms 100 --members 10 --rate 10000 --seconds 5 --pid "$one"
  run rooms-10k-two-nodes stoa-2-nodes --url "$a_url,$b_url" bench rooms --rooms 100 --members 10 --rate 10000 --seconds 5 --pid "$node_a"
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(label, key):
    v = [r[key] for r in rows if r["label"] == label and isinstance(r.get(key), (int, float))]
    return statistics.median(v) if v else None
print("| scenario | one node | two nodes and Redis | ratio | Redis commands per publish | lost |")
print("|---|---|---|---|---|---|")
for title, one, two, key in [
    ("fan-out 1,000 subscribers (deliveries/s)", "fanout-1000-one-node", "fanout-1000-two-nodes", "deliveries_per_sec"),
    ("rooms 100 x 10 at 10,000/s, p50 (ms)", "rooms-10k-one-node", "rooms-10k-two-nodes", "p50_ms"),
    ("rooms 100 x 10 at 10,000/s, p99 (ms)", "rooms-10k-one-node", "rooms-10k-two-nodes", "p99_ms"),
]:
    a, b = med(one, key), med(two, key)
    r = f"{b / a:.2f}" if a and b else "-"
    per = med(two, "redis_commands_per_publish")
    lost = med(two, "lost")
    print(f"| {title} | {a if a is None else round(a, 2):,} | {b if b is None else round(b, 2):,} | {r} | {per if per is None else round(per, 2)} | {lost} |")
PY
