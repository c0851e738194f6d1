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

# The soak (tests/tests/soak.rs) measures ten minutes of churn after a fifteen-minute
# warm-up, about 27 minutes in all, so it runs beside the lints and the other tests
# instead of after them: at the lowest CPU priority, in a session of its own (so that
# every process it starts can be stopped together), on ports of its own.
soak_test=ci_soak_after_warm_up
# --workspace, as in the build above: a single package's features would rebuild the
# dependencies.
soak_exe=$(cargo test --locked --workspace --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "soak" and m.get("executable"):
        print(m["executable"])')
if [ -z "$soak_exe" ] || [ "$(printf '%s\n' "$soak_exe" | wc -l)" -ne 1 ] || [ ! -x "$soak_exe" ]; then
    echo "run-all: expected one executable for tests/tests/soak.rs, cargo named: '$soak_exe'" >&2
    exit 1
fi
# target/debug/deps/soak-HASH -> target
target_dir=$(dirname "$(dirname "$(dirname "$soak_exe")")")
soak_log="$target_dir/ci-soak.log"
soak_pgid_file="$target_dir/ci-soak.pgid"
# A soak left behind by a run that was killed outright would share this one's files and
# CPU: stop it first (only if that process group is still a soak).
if [ -f "$soak_pgid_file" ]; then
    old=$(cat "$soak_pgid_file")
    if tr '\0' ' ' 2>/dev/null <"/proc/$old/cmdline" | grep -q "$soak_test"; then
        echo "run-all: stopping a soak left running by an earlier run (process group $old)"
        kill -- -"$old" 2>/dev/null || true
    fi
    rm -f "$soak_pgid_file"
fi
# Disjoint port ranges below the ephemeral ones (outgoing connections take those): the
# soak's 1,000, then 11,000 for every other test (tests/src/lib.rs, free_port).
ports_low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
if [ "$ports_low" -lt 13024 ]; then
    echo "run-all: the ephemeral port range starts at $ports_low; the tests need the 12,000" \
        "ports below it (sysctl net.ipv4.ip_local_port_range)" >&2
    exit 1
fi
soak_ports="$((ports_low - 12000))-$((ports_low - 11000))"
test_ports="$((ports_low - 11000))-$ports_low"
step "soak started in the background ($soak_exe, ports $soak_ports, log $soak_log)"
SERVANT_TEST_PORTS="$soak_ports" \
    setsid nice -n 19 "$soak_exe" --exact "$soak_test" --nocapture >"$soak_log" 2>&1 &
soak_pid=$!
echo "$soak_pid" >"$soak_pgid_file"
# `|| kill PID`: the trap may run before the child has made its own group.
stop_soak() { kill -- -"$soak_pid" 2>/dev/null || kill "$soak_pid" 2>/dev/null || true; }
trap stop_soak EXIT

step "lints"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "advisories"
bash tests/advisories.sh

step "tests (all but the soak, which is running)"
tests_rc=0
SERVANT_TEST_PORTS="$test_ports" \
    cargo test --locked --workspace --no-fail-fast -- --nocapture --skip "$soak_test" ||
    tests_rc=$?

step "soak (it ran beside the steps above; its output follows)"
soak_rc=0
wait "$soak_pid" || soak_rc=$?
# Whatever of its group outlived it (a node its harness failed to stop).
stop_soak
trap - EXIT
rm -f "$soak_pgid_file"
cat "$soak_log"
if [ "$tests_rc" -ne 0 ] || [ "$soak_rc" -ne 0 ]; then
    step "FAILED: tests exited $tests_rc, the soak $soak_rc"
    exit 1
fi

step "all tests passed"
