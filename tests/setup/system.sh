#!/usr/bin/env bash
# Installs the Debian packages the root-only tests and the file benchmark use:
# iptables (the partition test), iproute2 (network namespaces, veth, tc for the
# file benchmark), util-linux (mount, for the full-disk test's tmpfs) and
# miniupnpd-iptables (the NAT lab's UPnP router) and tcpdump (the NAT bench's
# --capture), and for tests/run-all.sh itself python3 (reads cargo's JSON to find the
# soak's test binary) and setsid from util-linux (runs the soak in a session of its
# own). miniupnpd-iptables is the bare daemon:
# Debian's service, its debconf questions and its config live in the `miniupnpd`
# package, which we do not install, so nothing starts a miniupnpd on this host;
# the lab runs its own in a router's namespace.
# Idempotent: installs only what is missing.
#
# Usage: tests/setup/system.sh   (as root, or with sudo available)
set -euo pipefail

SETUP_NAME=system.sh
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# package:program pairs; a package is installed when its program is missing.
install_missing iptables:iptables iproute2:ip util-linux:mount util-linux:setsid miniupnpd-iptables:miniupnpd tcpdump:tcpdump python3:python3
