#!/usr/bin/env bash
# Shrinks each target's committed corpus (fuzz/corpus/<target>) to at most MAX_FILES
# inputs (default 200) that keep as many coverage edges as possible, so the corpus
# stays small enough to commit and to replay in every `cargo test`.
#
# Usage: bash fuzz/trim.sh [MAX_FILES] [TARGET...]
#   CARGO_TARGET_DIR   where the targets are built (default: fuzz/target)
#
# How: libFuzzer runs every input once and records the coverage features of each
# (a set-cover merge with a control file: only that kind of merge writes each
# input's whole feature set, a plain merge writes only what is new so far;
# -use_counters=0 makes a feature an edge, not an edge's hit count). Then a greedy
# pick takes the generated seeds (seed-*, the readable valid and invalid examples),
# then repeatedly the input that adds the most features not yet covered, the smaller
# one on a tie, until MAX_FILES or until no input adds any. Everything else is
# deleted. `cargo fuzz cmin` does much the same without a cap.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

max_files="${1:-200}"
shift || true
target_dir="${CARGO_TARGET_DIR:-$here/target}"
build_flags=(-s none --codegen-units 16 --target-dir "$target_dir")

[[ "$max_files" =~ ^[0-9]+$ ]] || {
    echo "trim: MAX_FILES must be a number, got $max_files" >&2
    exit 1
}
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
cargo +stable fuzz build "${build_flags[@]}"

for target in "${targets[@]}"; do
    corpus="$here/corpus/$target"
    work="$target_dir/trim/$target"
    rm -rf "$work"
    mkdir -p "$work/out"
    # Every input is "new" to the empty output directory, so each one is run and
    # its coverage written to the control file.
    cargo +stable fuzz run "${build_flags[@]}" "$target" "$work/out" "$corpus" -- \
        -set_cover_merge=1 -use_counters=0 -merge_control_file="$work/control" >"$work/log" 2>&1 || {
        echo "trim: $target: libFuzzer failed, see $work/log" >&2
        exit 1
    }
    python3 - "$work/control" "$corpus" "$max_files" "$target" <<'PY'
import os
import sys

control, corpus, max_files, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
lines = open(control).read().splitlines()
count = int(lines[0])
files = lines[2:2 + count]
edges = {}
for line in lines[2 + count:]:
    if line.startswith("FT "):
        index, *covered = line.split()[1:]
        edges[int(index)] = set(covered)

def size(i):
    return os.path.getsize(files[i])

chosen, covered = [], set()
# Seeds first: they are the readable examples, and cheap.
for i, path in enumerate(files):
    if os.path.basename(path).startswith("seed-"):
        chosen.append(i)
        covered |= edges.get(i, set())
rest = [i for i in range(len(files)) if i not in set(chosen)]
while len(chosen) < max_files and rest:
    best = max(rest, key=lambda i: (len(edges.get(i, set()) - covered), -size(i)))
    gain = edges.get(best, set()) - covered
    if not gain:
        break
    chosen.append(best)
    covered |= gain
    rest.remove(best)
total = set().union(*edges.values()) if edges else set()
keep = {os.path.realpath(files[i]) for i in chosen}
for path in files:
    if os.path.realpath(path) not in keep:
        os.remove(path)
print(f"trim: {target}: kept {len(chosen)} of {len(files)} inputs, "
      f"{len(covered)} of {len(total)} features")
PY
done
