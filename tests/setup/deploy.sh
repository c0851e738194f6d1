#!/usr/bin/env bash
# Installs what tests/tests/deploy.rs needs to check deploy/:
#   systemd-analyze (Debian's systemd package): `verify` and `security --offline`
#     on the unit; neither needs systemd to be running, so a container will do;
#   strace: records the system calls of a running node, which must all pass the
#     unit's SystemCallFilter;
#   promtool (Debian's prometheus package, installed by prometheus.sh);
#   kubernetes-validate (PyPI, tests/py/requirements-deploy.txt) in tests/py/.venv,
#     which python.sh creates.
# Idempotent: installs only what is missing.
#
# Usage: tests/setup/deploy.sh   (as root, or with sudo available)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py_dir="$(cd "$here/../py" && pwd)"
venv="$py_dir/.venv"
requirements="$py_dir/requirements-deploy.txt"
stamp="$venv/.requirements-deploy.sha256"

SETUP_NAME=deploy.sh
# shellcheck source=tests/setup/common.sh
. "$here/common.sh"

# systemd's maintainer scripts cope with a machine where systemd is not PID 1.
install_missing systemd:systemd-analyze strace:strace
command -v promtool >/dev/null || die "promtool is missing: run tests/setup/prometheus.sh first"

# --- kubernetes-validate in the venv python.sh made.
[[ -x "$venv/bin/python" ]] || die "$venv does not exist: run tests/setup/python.sh first"
[[ -f "$requirements" ]] || die "$requirements not found"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/kubernetes-validate" ]]; then
    say "kubernetes-validate is up to date in $venv"
    exit 0
fi
say "installing $requirements into $venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q \
    -r "$requirements" || die "pip install -r $requirements failed"
"$venv/bin/kubernetes-validate" --version >/dev/null ||
    die "kubernetes-validate installed but does not run"
echo "$want" >"$stamp"
say "ready: $("$venv/bin/kubernetes-validate" --version 2>&1 | head -n1)"
