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

step "tests (unit, property, spec examples, doc tests)"
cargo test --workspace --all-features
