#!/usr/bin/env bash
# Side by side with RabbitMQ in the same run: every scenario of `stoa-cli bench` against
# stoa and against RabbitMQ (Web-STOMP, or STOMP for durable queues), alternating, RUNS
# times. The broker under test is pinned to CPU 0 and the load generator to CPU 1.
# Writes target/bench/results.jsonl, target/bench/latency.svg, and the results section of
# docs/PERFORMANCE.md. Minutes, not hours; not part of CI (a smoke run of each scenario is).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
out=target/bench
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

echo "==> RabbitMQ with rabbitmq_stomp and rabbitmq_web_stomp"
if ! command -v rabbitmq-server >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
# The reference RabbitMQ is a node of its own (stoa-bench@localhost: STOMP on 61633,
# Web-STOMP on 15694, data in /tmp/stoa-bench-rabbitmq), so that neither Stoa's default
# ports nor any other RabbitMQ on the machine are touched; it is stopped when the script
# ends. A fresh one per scenario group: RabbitMQ 3.10 here has come out of the connection
# and rooms scenarios with failing queue declarations (rabbit_memory_monitor gone).
rabbit_dir=/tmp/stoa-bench-rabbitmq
rabbit_node=stoa-bench@localhost
rabbit_env=(env RABBITMQ_NODENAME=$rabbit_node RABBITMQ_NODE_PORT=5692 RABBITMQ_DIST_PORT=25692
  RABBITMQ_CONFIG_FILE="$rabbit_dir/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$rabbit_dir/enabled_plugins"
  RABBITMQ_MNESIA_BASE="$rabbit_dir/mnesia" RABBITMQ_LOG_BASE="$rabbit_dir/log" HOME=/var/lib/rabbitmq)
rabbit_pid=""
stop_rabbit() {
  [ -n "$rabbit_pid" ] || return 0
  "${rabbit_env[@]}" rabbitmqctl -n "$rabbit_node" stop >/dev/null 2>&1 || kill "$rabbit_pid" 2>/dev/null || true
  # rabbitmqctl returns before the VM has exited: wait for this node's process alone.
  for _ in $(seq 1 120); do kill -0 "$rabbit_pid" 2>/dev/null || break; sleep 0.5; done
  rabbit_pid=""
}
fresh_rabbit() {
  stop_rabbit
  rm -rf "$rabbit_dir"
  mkdir -p "$rabbit_dir"
  printf '%s\n' 'listeners.tcp.default = 127.0.0.1:5692' 'stomp.listeners.tcp.1 = 127.0.0.1:61633' \
    'web_stomp.tcp.ip = 127.0.0.1' 'web_stomp.tcp.port = 15694' > "$rabbit_dir/rabbitmq.conf"
  echo '[rabbitmq_stomp,rabbitmq_web_stomp].' > "$rabbit_dir/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$rabbit_dir"
  # As the rabbitmq user directly rather than through Debian's wrapper, whose `su` puts the
  # open-files soft limit back to 1,024 (PAM): past about a thousand connections the conns
  # scenario then stalled (16 connects/s, the probe reaching nobody) and failed every run.
  ( cd /var/lib/rabbitmq && ulimit -n "$(ulimit -Hn)" &&
    taskset -c 0 setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
      "${rabbit_env[@]}" /usr/lib/rabbitmq/bin/rabbitmq-server -detached ) >/dev/null 2>&1 || true
  # Wait for the STOMP ports themselves: right after -detached the node may not even be
  # registered yet, and rabbitmqctl await_startup fails outright then.
  for _ in $(seq 1 360); do port_open 15694 && port_open 61633 && break; sleep 0.5; done
  port_open 15694 && port_open 61633 || { echo "RabbitMQ did not start (log: $rabbit_dir/log)" >&2; exit 1; }
  rabbit_pid=$("${rabbit_env[@]}" rabbitmqctl -n "$rabbit_node" eval 'os:getpid().' | tr -dc 0-9)
  taskset -a -pc 0 "$rabbit_pid" >/dev/null
}
trap stop_rabbit EXIT
fresh_rabbit

echo "==> release build"
cargo build --release -p broker -p client
cli=target/release/stoa-cli

# start_stoa LOG [ARGS...]: a fresh stoa on free ports, pinned to CPU 0, with ARGS; sets
# stoa_pid, stoa_http, stoa_stomp. Its data directory starts as a copy of $seed_dir if set.
data_dirs=()
start_stoa() {
  local log=$1 data
  shift
  data=$(mktemp -d)
  data_dirs+=("$data")
  [ -n "${seed_dir:-}" ] && cp -a "$seed_dir/." "$data/"
  # Started on CPU 0, so that it sizes its runtime to the one core it has.
  taskset -c 0 target/release/stoa --http-listen 127.0.0.1:0 --stomp-listen 127.0.0.1:0 --data-dir "$data" "$@" > "$log" 2>&1 &
  stoa_pid=$!
  for _ in $(seq 1 100); do grep -q listening "$log" && break; sleep 0.1; done
  stoa_http=$(grep -o 'http=[0-9.:]*' "$log" | cut -d= -f2)
  stoa_stomp=$(grep -o 'stomp=[0-9.:]*' "$log" | cut -d= -f2)
  taskset -a -pc 0 "$stoa_pid" >/dev/null
}

echo "==> stoa"
start_stoa "$out/stoa.log"
main_stoa=$stoa_pid
# stop_stoa PID: stops one of the stoas this script started and waits for it to exit.
stop_stoa() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# The brokers' data directories go with the script, however it ends.
trap 'stop_stoa $main_stoa; rm -rf "${data_dirs[@]}"; stop_rabbit' EXIT

# One core each: the broker on CPU 0, the generator on CPU 1.
gen() { taskset -c 1 timeout 600 "$cli" --connect-timeout 120 "$@"; }

# cpu_ticks PID: its utime + stime in clock ticks (0 once it is gone).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# settle: waits (at most 60 s) until neither broker used more than 5% of a core over half a
# second. Both share CPU 0: a broker still busy after its scenario (RabbitMQ closing a
# thousand connections, say) would otherwise take the core from the next one measured.
settle() {
  local pids=("$main_stoa") start=$SECONDS before after busy
  [ -n "${rabbit_pid:-}" ] && pids+=("$rabbit_pid")
  for _ in $(seq 1 120); do
    busy=0
    for pid in "${pids[@]}"; do
      before=$(cpu_ticks "$pid"); sleep 0.5; after=$(cpu_ticks "$pid")
      # Clock ticks are hundredths of a second: over 2 in 0.5 s is over 5% of a core.
      [ $((after - before)) -gt 2 ] && busy=1
    done
    [ "$busy" = 0 ] && break
  done
  [ $((SECONDS - start)) -gt 2 ] && echo "   (waited $((SECONDS - start)) s for the brokers to go idle)"
  return 0
}

# run LABEL BROKER ARGS...: one scenario, its JSON line tagged and appended.
run() {
  local label=$1 broker=$2; shift 2
  local line
  settle
  if line=$(gen "$@" 2>/dev/null | tail -1) && [ -n "$line" ]; then
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["label"]=sys.argv[2]; d["target"]=sys.argv[3]; print(json.dumps(d))' "$line" "$label" "$broker" >> "$results"
    echo "   $broker $label: ok"
  else
    echo "   $broker $label: FAILED" >&2
  fi
}

# Identity (issue #15): STORM accounts u0.. with passwords pw-0.. (Argon2id, made once
# with `stoa users add`, two at a time), and as many HS256 tokens for the same names.
STORM=${STORM:-5000}
accounts=$(mktemp -d)
data_dirs+=("$accounts")
echo "==> $STORM accounts and tokens"
seq 0 $((STORM - 1)) | xargs -P 2 -I{} sh -c \
  'echo "pw-{}" | target/release/stoa users --data-dir "$1" add --password-stdin "u{}" >/dev/null' _ "$accounts"
head -c 48 /dev/urandom | base64 > "$accounts/jwt.secret"
python3 - "$accounts/jwt.secret" "$STORM" > "$accounts/tokens" <<'PY'
import base64, hashlib, hmac, json, sys, time
secret = open(sys.argv[1], "rb").read().strip()
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
for n in range(int(sys.argv[2])):
    body = b64(json.dumps({"sub": f"u{n}", "exp": int(time.time()) + 86400}).encode())
    sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    print(f"{head}.{body}.{sig}")
PY

stoa_ws=(--url "ws://$stoa_http/ws")
stoa_tcp=(--url "tcp://$stoa_stomp")
rabbit_ws=(--url ws://127.0.0.1:15694/ws --login guest --passcode guest)
rabbit_tcp=(--url tcp://127.0.0.1:61633 --login guest --passcode guest)

for run_no in $(seq 1 "$RUNS"); do
  echo "==> run $run_no of $RUNS"
  run fanout-100 stoa "${stoa_ws[@]}" bench fanout --subscribers 100 --messages 50000 --pid "$main_stoa"
  run fanout-100 rabbitmq "${rabbit_ws[@]}" bench fanout --subscribers 100 --messages 2000 --seconds 300 --pid "$rabbit_pid"
  run fanout-1000 stoa "${stoa_ws[@]}" bench fanout --subscribers 1000 --messages 5000 --pid "$main_stoa"
  run fanout-1000 rabbitmq "${rabbit_ws[@]}" bench fanout --subscribers 1000 --messages 200 --seconds 300 --pid "$rabbit_pid"
  run queue stoa "${stoa_tcp[@]}" bench queue --publishers 8 --messages 50000
  run queue rabbitmq "${rabbit_tcp[@]}" bench queue --publishers 8 --messages 50000
  run rooms-20k stoa "${stoa_ws[@]}" bench rooms --rooms 100 --members 10 --rate 20000 --seconds 5 --pid "$main_stoa"
  fresh_rabbit
  run rooms-20k rabbitmq "${rabbit_ws[@]}" bench rooms --rooms 100 --members 10 --rate 20000 --seconds 5 --pid "$rabbit_pid"
  # Memory per connection is measured on fresh brokers: a broker that ran other scenarios
  # reuses freed memory and would look cheaper than it is. Rooms of 10, as above.
  start_stoa "$out/stoa-conns.log"
  run conns-19000 stoa --url "ws://$stoa_http/ws" bench conns --connections 19000 --pid "$stoa_pid"
  stop_stoa "$stoa_pid"
  # The same with one connection per room: each join notice reaches only its joiner. The
  # difference is what DESIGN.md's join notices to the other members cost.
  start_stoa "$out/stoa-conns-alone.log"
  run conns-19000-alone stoa --url "ws://$stoa_http/ws" bench conns --connections 19000 --rooms 19000 --pid "$stoa_pid"
  stop_stoa "$stoa_pid"
  # Connects/s in each --auth mode, one connection per room, all STORM at once. In users
  # mode the first wave is a reconnect storm on a cold login cache (every login through
  # Argon2), the second the same storm within --login-cache-seconds.
  start_stoa "$out/stoa-auth-none.log"
  run "auth-none" stoa --url "ws://$stoa_http/ws" bench conns --connections "$STORM" --rooms "$STORM" --parallel "$STORM" --pid "$stoa_pid"
  stop_stoa "$stoa_pid"
  start_stoa "$out/stoa-auth-jwt.log" --auth jwt --jwt-secret-file "$accounts/jwt.secret"
  run "auth-jwt" stoa --url "ws://$stoa_http/ws" bench conns --connections "$STORM" --rooms "$STORM" --parallel "$STORM" --tokens "$accounts/tokens" --pid "$stoa_pid"
  stop_stoa "$stoa_pid"
  seed_dir=$accounts start_stoa "$out/stoa-auth-users.log" --auth users
  run "auth-users-cold" stoa --url "ws://$stoa_http/ws" bench conns --connections "$STORM" --rooms "$STORM" --parallel "$STORM" --seconds 500 --passcode-prefix pw- --pid "$stoa_pid"
  run "auth-users-warm" stoa --url "ws://$stoa_http/ws" bench conns --connections "$STORM" --rooms "$STORM" --parallel "$STORM" --passcode-prefix pw- --pid "$stoa_pid"
  stop_stoa "$stoa_pid"
  fresh_rabbit
  run conns-5000 rabbitmq "${rabbit_ws[@]}" bench conns --connections 5000 --parallel 32 --pid "$rabbit_pid"
  fresh_rabbit
  run rooms-100k stoa "${stoa_ws[@]}" bench rooms --rooms 100 --members 10 --rate 100000 --seconds 5 --pid "$main_stoa"
done
# Several nodes (issue #16): two nodes sharing Redis beside one node, in a script of its
# own (it can run alone); its lines join this run's results.
echo "==> several nodes"
RUNS=$RUNS scripts/bench-cluster.sh
cat "$out/cluster.jsonl" >> "$results"

# The fallbacks (issue #17): every technique on the same rooms scenario, in a script of its
# own that writes its own section of docs/PERFORMANCE.md and docs/fallbacks.svg.
echo "==> when WebSocket cannot get through"
RUNS=$RUNS scripts/bench-fallbacks.sh

# The soak (issue #18): twenty minutes of a chat-like mix, memory and descriptors sampled.
echo "==> soak"
scripts/bench-soak.sh

echo "==> stoa: highest room rate with p99 under 50 ms"
run rooms-step stoa "${stoa_ws[@]}" bench rooms --rooms 100 --members 10 --rate 200000 --seconds 3 --step --pid "$main_stoa"

echo "==> report"
python3 scripts/bench_report.py "$results" "$out/latency.svg" docs/PERFORMANCE.md
echo "results: $results; plot: $out/latency.svg (copied to docs/latency.svg); table: docs/PERFORMANCE.md"
