#!/usr/bin/env bash
# Sets up tests/py/.venv for the py-libp2p interop test (tests/tests/interop_py.rs).
#
# Idempotent: a venv whose installed requirements match tests/py/requirements.txt
# is left alone. Needs Python >= 3.10 ($PYTHON, else python3.11 / pyenv's 3.11 /
# python3.12 / python3.13 / python3.10 / python3). py-libp2p pulls in fastecdsa,
# which PyPI ships only as source: building it needs a C compiler, libgmp-dev and
# the Python headers; missing Debian packages are installed with apt-get (as root).
#
#   bash tests/setup/python.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py_dir="$(cd "$here/../py" && pwd)"
venv="$py_dir/.venv"
requirements="$py_dir/requirements.txt"
stamp="$venv/.requirements.sha256"
log="$venv/pip-install.log"

SETUP_NAME=python.sh
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ -f "$requirements" ]] || die "$requirements not found"

# --- 1. An interpreter: Python >= 3.10 with venv support. -------------------------
usable() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(not (3, 10) <= sys.version_info[:2] < (4, 0))' \
        >/dev/null 2>&1
}

find_python() {
    local candidates=()
    [[ -n "${PYTHON:-}" ]] && candidates+=("$PYTHON")
    candidates+=(python3.11)
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    local p
    for p in "$pyenv_root"/versions/3.11*/bin/python3.11; do
        [[ -x "$p" ]] && candidates+=("$p")
    done
    candidates+=(python3.12 python3.13 python3.10 python3)
    for p in "${candidates[@]}"; do
        if usable "$p"; then
            # The real interpreter, not a pyenv shim whose target can change.
            "$p" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 1
}

python="$(find_python)" || die "no Python >= 3.10 with the venv module found (set PYTHON=/path/to/python3.11;
on Debian: apt-get install python3 python3-venv python3-dev)"
python_version="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
say "using $python (Python $python_version)"

# --- 2. Up to date already? -------------------------------------------------------
want_stamp="$(sha256sum "$requirements" | cut -d' ' -f1) $python_version"
smoke_test() {
    "$venv/bin/python" - <<'EOF' >/dev/null 2>&1
import blake3, multiaddr, trio
import libp2p
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
EOF
}

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]] && smoke_test; then
    say "$venv is up to date ($(cat "$stamp" | cut -c1-12)…, Python $python_version): nothing to do"
    exit 0
fi

# --- 3. System packages for building fastecdsa (only when missing). ----------------
have_deb() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
has_python_headers() {
    "$python" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
}
has_gmp_header() {
    local include
    for include in /usr/include /usr/local/include /usr/include/*-linux-gnu; do
        [[ -f "$include/gmp.h" ]] && return 0
    done
    return 1
}

missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
has_gmp_header || missing+=(libgmp-dev)
if ! has_python_headers; then
    # Only Debian's own interpreter gets its headers from a package; pyenv and
    # python.org builds ship them.
    case "$python" in
        /usr/bin/*) missing+=("python${python_version%.*}-dev") ;;
        *) die "$python has no Python.h (needed to build fastecdsa); use a Python with headers" ;;
    esac
fi
if [[ "$python" == /usr/bin/* ]] && ! "$python" -c 'import ensurepip' >/dev/null 2>&1; then
    missing+=("python${python_version%.*}-venv")
fi

if ((${#missing[@]})); then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
        say "installing missing system packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || die "apt-get update failed"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed"
        have_deb libgmp-dev || has_gmp_header || die "libgmp-dev still missing after apt-get"
    else
        die "missing system packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})"
    fi
else
    say "system packages present (gcc, libgmp-dev, Python headers)"
fi

# --- 4. The venv and the requirements. --------------------------------------------
if [[ -d "$venv" ]] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "$venv is broken (its interpreter does not run): recreating it"
    rm -rf "$venv"
fi
if [[ -x "$venv/bin/python" ]]; then
    venv_version="$("$venv/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
    if [[ "$venv_version" != "$python_version" ]]; then
        say "$venv has Python $venv_version, not $python_version: recreating it"
        rm -rf "$venv"
    fi
fi
if [[ ! -x "$venv/bin/python" ]]; then
    say "creating $venv"
    "$python" -m venv "$venv" || die "could not create the venv at $venv"
else
    say "reusing $venv"
fi

say "installing $requirements (log: $log; building fastecdsa takes about a minute the first time)"
started=$(date +%s)
if ! "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
    -r "$requirements" >"$log" 2>&1; then
    echo "----- last lines of $log -----" >&2
    tail -n 40 "$log" >&2
    die "pip install -r $requirements failed (see above)"
fi
say "pip install done in $(($(date +%s) - started)) s"

smoke_test || die "the venv installed but 'import libp2p, blake3, trio, multiaddr' fails: see $log"
"$venv/bin/python" "$py_dir/interop_peer.py" --help >/dev/null \
    || die "$py_dir/interop_peer.py --help fails in the venv"
echo "$want_stamp" >"$stamp"
say "ready: $("$venv/bin/python" -m pip show libp2p 2>/dev/null | grep '^Version' | sed 's/Version: /libp2p /'), $venv/bin/python"
