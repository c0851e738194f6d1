#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, one after another,
# and prints executions, coverage and corpus size per target.
#
# Usage: bash fuzz/run.sh [SECONDS] [TARGET...]      (default: 60 s, every target)
#   SERVANT_FUZZ_SANITIZER  none (default) or address, memory, thread, leak
#   SERVANT_FUZZ_MERGE=1    afterwards, add the inputs that found new coverage to
#                           fuzz/corpus/<target> (libFuzzer's -merge=1 keeps only
#                           those, so the committed corpus stays small)
#   CARGO_TARGET_DIR        where to build (default: fuzz/target)
#
# Toolchain: the stable one. cargo-fuzz's instrumentation (SanitizerCoverage) works on
# stable; only its sanitizers are unstable rustc flags, so with a sanitizer the build
# runs with RUSTC_BOOTSTRAP=1 (stable rustc accepting -Z flags) instead of needing a
# nightly toolchain. New inputs go to a scratch corpus under the target dir; crashes to
# fuzz/artifacts/<target>/. Exits 1 if any target crashed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

seconds="${1:-60}"
shift || true
sanitizer="${SERVANT_FUZZ_SANITIZER:-none}"
target_dir="${CARGO_TARGET_DIR:-$here/target}"

say() { echo "fuzz: $*"; }
die() {
    echo "fuzz: ERROR: $*" >&2
    exit 1
}

cargo fuzz --version >/dev/null 2>&1 || die "cargo-fuzz is missing: nice -n 19 cargo install cargo-fuzz --locked"
[[ "$seconds" =~ ^[0-9]+$ ]] || die "SECONDS must be a number, got $seconds"

env_flags=()
if [ "$sanitizer" != "none" ]; then
    env_flags=(RUSTC_BOOTSTRAP=1)
fi
# 16 codegen units: a build of the whole node takes minutes instead of tens of
# minutes on two cores, for somewhat slower executions.
build_flags=(-s "$sanitizer" --codegen-units 16 --target-dir "$target_dir")

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

say "building ${#targets[@]} targets (sanitizer: $sanitizer)"
env "${env_flags[@]}" cargo +stable fuzz build "${build_flags[@]}"

summary=()
failed=()
for target in "${targets[@]}"; do
    corpus="$here/corpus/$target"
    scratch="$target_dir/fuzz-corpus/$target"
    log="$target_dir/fuzz-logs/$target.log"
    mkdir -p "$corpus" "$scratch" "$(dirname "$log")"
    say "$target for ${seconds}s"
    # The scratch directory comes first: libFuzzer writes new inputs to the first
    # corpus directory only, so the committed one is read, not grown.
    set +e
    env "${env_flags[@]}" cargo +stable fuzz run "${build_flags[@]}" "$target" "$scratch" "$corpus" -- \
        -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 \
        >"$log" 2>&1
    status=$?
    set -e
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n1 || true)
    execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -n1)
    cov=$(sed -nE 's/.* cov: ([0-9]+) ft: ([0-9]+) corp: ([0-9]+).*/cov \1, features \2, corpus \3/p' <<<"$done_line")
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        summary+=("$target: FAILED (exit $status), see $log and $here/artifacts/$target/")
        tail -n 40 "$log" >&2
        continue
    fi
    summary+=("$target: ${execs:-?} executions in ${seconds}s, ${cov:-no final stats}")
    if [ "${SERVANT_FUZZ_MERGE:-0}" = "1" ]; then
        env "${env_flags[@]}" cargo +stable fuzz run "${build_flags[@]}" "$target" "$corpus" "$scratch" -- \
            -merge=1 >>"$log" 2>&1 || die "merging $target's corpus failed, see $log"
        summary+=("    merged: $(find "$corpus" -type f | wc -l) files in corpus/$target")
    fi
done

echo
say "summary"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    die "crashes in: ${failed[*]}"
fi
