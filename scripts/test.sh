#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every test.
# README.md names it; .ci/run calls it. Safe to run again: installs are skipped when present.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "system packages: Debian's chromium (never a downloaded browser), fonts, RabbitMQ, Redis, python3-venv"
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-noto-cjk fonts-noto-color-emoji)
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
# The cluster tests start their own redis-server on a free port; the package's own service
# is not used.
command -v redis-server >/dev/null || missing+=(redis-server)
# Debian's python3 makes a venv only with python3-venv (ensurepip).
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages and not root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

step "RabbitMQ, for testing the client against another broker: a node of its own with STOMP on 61623 and Web-STOMP on 15684 (Stoa's 61613 and 8080 stay free), stopped when the tests end"
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
rabbit_dir=/tmp/stoa-test-rabbitmq
rabbit=(env RABBITMQ_NODENAME=stoa-test@localhost RABBITMQ_NODE_PORT=5682 RABBITMQ_DIST_PORT=25682
  RABBITMQ_CONFIG_FILE="$rabbit_dir/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$rabbit_dir/enabled_plugins"
  RABBITMQ_MNESIA_BASE="$rabbit_dir/mnesia" RABBITMQ_LOG_BASE="$rabbit_dir/log")
stop_rabbit() { "${rabbit[@]}" rabbitmqctl -n stoa-test@localhost stop >/dev/null 2>&1 || true; }
if ! port_open 61623 || ! port_open 15684; then
  mkdir -p "$rabbit_dir"
  printf '%s\n' 'listeners.tcp.default = 127.0.0.1:5682' 'stomp.listeners.tcp.1 = 127.0.0.1:61623' \
    'web_stomp.tcp.ip = 127.0.0.1' 'web_stomp.tcp.port = 15684' > "$rabbit_dir/rabbitmq.conf"
  echo '[rabbitmq_stomp,rabbitmq_web_stomp].' > "$rabbit_dir/enabled_plugins"
  # Debian's wrapper runs the node as the rabbitmq user.
  if [ "$(id -u)" -eq 0 ]; then chown -R rabbitmq:rabbitmq "$rabbit_dir"; fi
  "${rabbit[@]}" rabbitmq-server -detached >/dev/null 2>&1 || true
  # Wait for the STOMP ports themselves: right after -detached the node may not even be
  # registered yet, and rabbitmqctl await_startup fails outright then.
  for _ in $(seq 1 360); do
    if port_open 15684 && port_open 61623; then break; fi
    sleep 0.5
  done
fi
trap stop_rabbit EXIT
port_open 15684 && port_open 61623 || { echo "RabbitMQ did not start" >&2; exit 1; }
export STOA_RABBITMQ_STOMP=tcp://127.0.0.1:61623 STOA_RABBITMQ_WS=ws://127.0.0.1:15684/ws

step "toolchain"
cargo --version
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "build (stoa and stoa-cli, which the black-box tests start)"
cargo build --workspace --all-features

step "tests (unit, property, spec examples, doc tests, black-box through the real binaries)"
cargo test --workspace --all-features

step "stomp.py against stoa, and stoa-cli chat in pseudo-terminals"
venv=target/test-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r integration-tests/python/requirements.txt
STOA_BIN="$PWD/target/debug/stoa" "$venv/bin/python" -m pytest -q integration-tests/python

step "@stomp/stompjs and the chat page in headless Chromium against stoa (Node)"
npm --prefix integration-tests/node ci --no-audit --no-fund --loglevel=error
STOA_BIN="$PWD/target/debug/stoa" npm --prefix integration-tests/node test
echo "screenshots of the page: target/screenshots/"

step "the machine is left ready for the run command: stoa starts on its default ports"
stop_rabbit
trap - EXIT
ready=$(mktemp -d)
target/debug/stoa --data-dir "$ready/data" > "$ready/log" 2>&1 &
ready_pid=$!
for _ in $(seq 1 100); do
  grep -q listening "$ready/log" && break
  kill -0 "$ready_pid" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q listening "$ready/log"; then
  cat "$ready/log" >&2
  echo "stoa cannot start on 127.0.0.1:8080 and :61613 after the tests: something they started holds a port" >&2
  exit 1
fi
kill "$ready_pid"; wait "$ready_pid" 2>/dev/null || true
rm -rf "$ready"
