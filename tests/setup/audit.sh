#!/usr/bin/env bash
# Installs cargo-audit, which tests/advisories.sh runs against the offline RustSec
# database. Idempotent: when the pinned version is on PATH already, it only says so.
#
# The version is pinned because the database format and cargo-audit's reading of it
# move together: 0.22.2 is the version checked to read the snapshot at
# ../shared/advisory-db (see ../shared/ADVISORY-DB.md). `--locked` builds it with the
# dependency versions its authors tested, not whatever crates.io resolves today.
#
# Usage: tests/setup/audit.sh   (needs cargo and crates.io; about 5 minutes on two cores)
set -euo pipefail

VERSION=0.22.2

SETUP_NAME=audit.sh
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

command -v cargo >/dev/null || die "cargo is not on PATH"

# `cargo audit --version` prints "cargo-audit-audit 0.22.2" (the subcommand name
# doubled); match the version number alone.
installed=$(cargo audit --version 2>/dev/null | awk '{print $NF}' || true)
if [ "$installed" = "$VERSION" ]; then
    say "cargo-audit $VERSION already installed ($(command -v cargo-audit))"
    exit 0
fi
if [ -n "$installed" ]; then
    say "cargo-audit $installed installed; replacing it with $VERSION"
fi
say "installing cargo-audit $VERSION (a few minutes)"
# nice: the install competes with the build that follows in CI, not with users.
nice -n 19 cargo install cargo-audit --locked --version "$VERSION" --force ||
    die "cargo install cargo-audit $VERSION failed"
say "installed $(cargo audit --version)"
