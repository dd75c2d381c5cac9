#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every test.
# README.md names it; .ci/run calls it. Safe to run again: installs are skipped when present.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "system packages: Debian's chromium (never a downloaded browser), fonts, RabbitMQ, Redis"
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-noto-cjk fonts-noto-color-emoji)
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
# The cluster tests start their own redis-server on a free port; the package's own service
# is not used.
command -v redis-server >/dev/null || missing+=(redis-server)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages and not root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

step "RabbitMQ with STOMP (61613) and Web-STOMP (15674), for testing the client against another broker"
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! port_open 15674 || ! port_open 61613; then
  rabbitmq-plugins enable --offline rabbitmq_stomp rabbitmq_web_stomp >/dev/null
  rabbitmq-server -detached >/dev/null 2>&1 || true
  # Wait for the STOMP ports themselves: right after -detached the node may not even be
  # registered yet, and rabbitmqctl await_startup fails outright then.
  for _ in $(seq 1 360); do
    if port_open 15674 && port_open 61613; then break; fi
    sleep 0.5
  done
fi
port_open 15674 && port_open 61613 || { echo "RabbitMQ did not start" >&2; exit 1; }
export STOA_RABBITMQ=1

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
