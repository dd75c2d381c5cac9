# What the bench scripts share (sourced, not run): a release build, brokers started on free
# ports pinned to CPU 0, and everything they started stopped and removed when the script
# ends. Sets `cli`, and for each `start`, `pid` and `http`.
cargo build --release -p broker -p client >/dev/null 2>&1 || cargo build --release -p broker -p client
cli=target/release/stoa-cli

pids=() dirs=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "${dirs[@]}"
}
trap cleanup EXIT

# start LOG [ARGS...]: a fresh stoa on free ports with ARGS, every thread on CPU 0; sets pid
# and http.
start() {
  local log=$1 data; shift
  data=$(mktemp -d); dirs+=("$data")
  taskset -c 0 target/release/stoa --http-listen 127.0.0.1:0 --stomp-listen 127.0.0.1:0 --data-dir "$data" "$@" > "$log" 2>&1 &
  pid=$!; pids+=("$pid")
  for _ in $(seq 1 100); do grep -q listening "$log" && break; sleep 0.1; done
  http=$(grep -o 'http=[0-9.:]*' "$log" | cut -d= -f2)
  taskset -a -pc 0 "$pid" >/dev/null
}

# stop PID: stops a stoa this script started and waits for it.
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
