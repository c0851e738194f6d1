#!/usr/bin/env bash
# Installs the Debian packages the root-only tests and the file benchmark use:
# iptables (the partition test), iproute2 (network namespaces, veth, tc for the
# file benchmark) and util-linux (mount, for the full-disk test's tmpfs).
# Idempotent: installs only what is missing.
#
# Usage: tests/setup/system.sh   (as root, or with sudo available)
set -euo pipefail

say() { echo "system.sh: $*"; }
die() {
    echo "system.sh: ERROR: $*" >&2
    exit 1
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "must run as root (or with sudo installed)"
    SUDO=(sudo)
fi

# package:program pairs; a package is installed when its program is missing.
missing=()
for pair in iptables:iptables iproute2:ip util-linux:mount; do
    pkg="${pair%%:*}"
    prog="${pair##*:}"
    if command -v "$prog" >/dev/null || [ -x "/usr/sbin/$prog" ] || [ -x "/sbin/$prog" ]; then
        say "$pkg present ($prog)"
    else
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
command -v apt-get >/dev/null || die "missing ${missing[*]} and apt-get is not available (not Debian?)"
say "installing ${missing[*]}"
"${SUDO[@]}" apt-get update -q || die "apt-get update failed"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}" || die "apt-get install ${missing[*]} failed"
