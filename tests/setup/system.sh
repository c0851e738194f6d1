#!/usr/bin/env bash
# Installs the Debian packages the root-only tests and the file benchmark use:
# iptables (the partition test), iproute2 (network namespaces, veth, tc for the
# file benchmark) and util-linux (mount, for the full-disk test's tmpfs).
# Idempotent: installs only what is missing.
#
# Usage: tests/setup/system.sh   (as root, or with sudo available)
set -euo pipefail

SETUP_NAME=system.sh
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# package:program pairs; a package is installed when its program is missing.
install_missing iptables:iptables iproute2:ip util-linux:mount
