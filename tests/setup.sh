#!/usr/bin/env bash
# Installs what the tests need beyond Rust: Debian packages (iptables, iproute2,
# util-linux, prometheus) and a Python
# venv with py-libp2p; for the deploy/ checks, systemd-analyze, strace and
# kubernetes-validate (deploy.sh, after python.sh); cargo-audit for the advisory gate
# (audit.sh). Idempotent: a second run only checks.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for step in system prometheus python docker deploy audit; do
    echo "== setup: $step"
    bash "$here/setup/$step.sh"
done
