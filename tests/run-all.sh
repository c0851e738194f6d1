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

# The soak (tests/tests/soak.rs) measures five minutes of churn after a fifteen-minute
# warm-up, about 22 minutes in all, so it runs beside the lints and the other tests
# instead of after them: at the lowest CPU priority, in a session of its own (so that
# every process it starts can be stopped together), on ports of its own.
soak_test=ci_soak_five_minutes_after_warm_up
soak_log="$CARGO_TARGET_DIR/ci-soak.log"
# --workspace, as in the build above: a single package's features would rebuild the
# dependencies.
soak_exe=$(cargo test --locked --workspace --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "soak" and m.get("executable"):
        print(m["executable"])')
if [ -z "$soak_exe" ]; then
    echo "run-all: cargo named no executable for tests/tests/soak.rs" >&2
    exit 1
fi
ports_low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
# free_port's own range is the 12,000 ports below the ephemeral ones; the soak takes the
# 1,000 below that.
soak_ports_high=$((ports_low - 12000))
if [ "$soak_ports_high" -lt 2048 ]; then soak_ports_high=2048; fi
step "soak started in the background ($soak_exe, log $soak_log)"
SERVANT_TEST_PORTS="$((soak_ports_high - 1000))-$soak_ports_high" \
    setsid nice -n 19 "$soak_exe" --exact "$soak_test" --nocapture >"$soak_log" 2>&1 &
soak_pid=$!
trap 'kill -- -"$soak_pid" 2>/dev/null || true' EXIT

step "lints"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "advisories"
bash tests/advisories.sh

step "tests (all but the soak, which is running)"
tests_rc=0
cargo test --locked --workspace --no-fail-fast -- --nocapture --skip "$soak_test" || tests_rc=$?

step "soak (it ran beside the steps above; its output follows)"
soak_rc=0
wait "$soak_pid" || soak_rc=$?
trap - EXIT
cat "$soak_log"
if [ "$tests_rc" -ne 0 ] || [ "$soak_rc" -ne 0 ]; then
    step "FAILED: tests exited $tests_rc, the soak $soak_rc"
    exit 1
fi

step "all tests passed"
