#!/usr/bin/env bash
# The advisory gate: checks Cargo.lock against the RustSec advisory database kept
# offline (no database can be fetched on these machines) and fails on
#   - any advisory that matches a locked crate (vulnerability, unmaintained, unsound,
#     notice) and is not ignored, with a reason, in tests/advisories.toml;
#   - any locked crate below a floor in that file's [[minimum]] entries, which stand
#     in for advisories published after the database snapshot.
#
# Usage: tests/advisories.sh
#   SERVANT_ADVISORY_DB  the database (default: ../shared/advisory-db beside the repo)
#
# Needs cargo-audit 0.22.2 (tests/setup/audit.sh installs it) and python3 (3.11+,
# for tomllib). Without the database or cargo-audit it says so loudly and skips;
# under CI=true that is a failure, as for every other test that cannot run.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
db="${SERVANT_ADVISORY_DB:-$repo/../shared/advisory-db}"
lock="$repo/Cargo.lock"
policy="$repo/tests/advisories.toml"

say() { echo "advisories: $*"; }
skip() {
    echo "advisories: SKIPPED: $*" >&2
    if [ "${CI:-}" = "true" ] || [ "${CI:-}" = "1" ]; then
        echo "advisories: under CI a skip is a failure" >&2
        exit 1
    fi
    exit 0
}

command -v python3 >/dev/null || skip "python3 is not installed"
[ -d "$db/crates" ] || skip "no advisory database at $db (set SERVANT_ADVISORY_DB)"
cargo audit --version >/dev/null 2>&1 || skip "cargo-audit is not installed (bash tests/setup/audit.sh)"
[ -f "$lock" ] || {
    echo "advisories: ERROR: no $lock" >&2
    exit 1
}

# --no-fetch: the database is a snapshot, not a git clone to update.
# --no-yanked: whether a version was yanked needs the crates.io index; offline, the
#   database is the only source of truth, and a check that cannot run should not
#   pass silently either.
# No --ignore flags: every match is reported, and the policy is applied below, so
# an ignore that no longer matches anything can be reported as stale.
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
set +e
cargo audit --db "$db" --no-fetch --no-yanked --file "$lock" --json >"$report" 2>"$report.err"
status=$?
set -e
if ! python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$report" 2>/dev/null; then
    echo "advisories: ERROR: cargo audit (exit $status) gave no report:" >&2
    cat "$report.err" >&2
    rm -f "$report.err"
    exit 1
fi
rm -f "$report.err"

python3 - "$report" "$policy" "$lock" "$db" <<'PY'
import json
import sys
import tomllib

report_path, policy_path, lock_path, db = sys.argv[1:5]
report = json.load(open(report_path))
with open(policy_path, "rb") as f:
    policy = tomllib.load(f)
with open(lock_path, "rb") as f:
    lock = tomllib.load(f)

errors = []

# The policy itself: every ignore names an id and says why.
ignores = {}
for entry in policy.get("ignore", []):
    advisory_id = str(entry.get("id", "")).strip()
    reason = " ".join(str(entry.get("reason", "")).split())
    if not advisory_id:
        errors.append(f"{policy_path}: an [[ignore]] entry has no id")
        continue
    if not reason:
        errors.append(f"{policy_path}: ignore {advisory_id} has no reason")
        continue
    ignores[advisory_id] = (entry.get("crate", "?"), reason)

# Every advisory cargo-audit matched, whatever its kind.
found = []
for item in report.get("vulnerabilities", {}).get("list", []):
    found.append(("vulnerability", item))
for kind, items in report.get("warnings", {}).items():
    for item in items:
        found.append((item.get("kind", kind), item))

used = set()
print(f"advisories: {report['database']['advisory-count']} advisories in {db}; "
      f"{report['lockfile']['dependency-count']} crates in Cargo.lock")
for kind, item in found:
    advisory = item.get("advisory") or {}
    package = item.get("package", {})
    names = [advisory.get("id", "")] + list(advisory.get("aliases", []))
    label = (f"{advisory.get('id', '?')} {package.get('name')} {package.get('version')} "
             f"({kind}): {advisory.get('title', '')}")
    match = next((n for n in names if n in ignores), None)
    if match:
        used.add(match)
        print(f"advisories: ignored {label}\n    because: {ignores[match][1]}")
    else:
        url = advisory.get("url") or f"https://rustsec.org/advisories/{advisory.get('id', '')}"
        errors.append(f"{label}\n    {url}\n    upgrade the crate, or add an [[ignore]] "
                      f"with a reason to tests/advisories.toml")

for advisory_id in sorted(set(ignores) - used):
    print(f"advisories: note: ignore {advisory_id} ({ignores[advisory_id][0]}) matched "
          f"nothing in Cargo.lock; delete it from tests/advisories.toml")

# Floors for advisories newer than the database.
def version_key(text):
    core, _, pre = text.partition("-")
    parts = tuple(int(p) for p in core.split("."))
    # A pre-release sorts before its release.
    return parts, (0 if pre else 1), pre

locked = {}
for package in lock.get("package", []):
    locked.setdefault(package["name"], []).append(package["version"])
for floor in policy.get("minimum", []):
    name, minimum = floor["crate"], floor["version"]
    reason = " ".join(str(floor.get("reason", "")).split())
    if not reason:
        errors.append(f"{policy_path}: minimum for {name} has no reason")
    versions = locked.get(name)
    if not versions:
        errors.append(f"{name} is not in Cargo.lock, but tests/advisories.toml keeps a "
                      f"floor of {minimum} for it: check why it left before deleting the floor")
        continue
    for version in versions:
        if version_key(version) < version_key(minimum):
            errors.append(f"{name} {version} is below {minimum}: {reason}")
        else:
            print(f"advisories: {name} {version} >= {minimum} (floor: {reason})")

if errors:
    print(f"\nadvisories: FAILED, {len(errors)} problem(s):", file=sys.stderr)
    for error in errors:
        print(f"  - {error}", file=sys.stderr)
    sys.exit(1)
print(f"advisories: passed ({len(found)} matched, all ignored with a reason)")
PY
