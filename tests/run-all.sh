#!/usr/bin/env bash
# Runs every test of the project: set-up, formatting, build, lints, unit and
# integration tests. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "prerequisites"
bash tests/setup.sh

step "format"
cargo fmt --all -- --check

step "build (the integration tests run the servant binary)"
cargo build --locked --workspace --all-targets

step "lints"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "advisories"
bash tests/advisories.sh

step "tests"
cargo test --locked --workspace --no-fail-fast -- --nocapture

step "all tests passed"
