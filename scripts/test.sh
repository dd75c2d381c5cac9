#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every test.
# README.md names it; .ci/run calls it. Safe to run again: installs are skipped when present.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
cargo --version
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "build (the stoa binary the black-box tests start)"
cargo build --workspace --all-features

step "tests (unit, property, spec examples, doc tests, black-box through the real binary)"
cargo test --workspace --all-features

step "stomp.py against stoa"
venv=target/test-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r integration-tests/python/requirements.txt
STOA_BIN="$PWD/target/debug/stoa" "$venv/bin/python" -m pytest -q integration-tests/python

step "Debian chromium for the page's browser tests (never a downloaded browser)"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is missing and this is not root: apt-get install chromium fonts-noto-cjk fonts-noto-color-emoji" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium fonts-noto-cjk fonts-noto-color-emoji >/dev/null
fi

step "@stomp/stompjs and the chat page in headless Chromium against stoa (Node)"
npm --prefix integration-tests/node ci --no-audit --no-fund --loglevel=error
STOA_BIN="$PWD/target/debug/stoa" npm --prefix integration-tests/node test
echo "screenshots of the page: target/screenshots/"
