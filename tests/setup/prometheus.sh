#!/usr/bin/env bash
# Installs Debian's `prometheus` package for tests/tests/prometheus.rs, which starts
# its own Prometheus process (own config, storage dir and port). Idempotent.
#
# The package would also start a system Prometheus (sysvinit script or systemd
# unit) scraping localhost and holding 127.0.0.1:9090; this script keeps it from
# starting during the install, and stops and disables it if it runs anyway.
#
# Usage: tests/setup/prometheus.sh   (as root, or with sudo available)
set -euo pipefail

SETUP_NAME=prometheus.sh
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

systemd_runs() { [ -d /run/systemd/system ]; }

# --- install ------------------------------------------------------------------
if command -v prometheus >/dev/null; then
    say "prometheus already installed: $(command -v prometheus) ($(prometheus --version 2>&1 | head -n1))"
else
    command -v apt-get >/dev/null || die "prometheus is not on PATH and apt-get is missing (not Debian?)"
    export DEBIAN_FRONTEND=noninteractive

    # Keep maintainer scripts from starting the service while installing: a
    # policy-rc.d that answers 101 ("action forbidden") is honoured by both
    # invoke-rc.d and deb-systemd-invoke. Leave an existing one alone.
    POLICY=/usr/sbin/policy-rc.d
    if [ ! -e "$POLICY" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY && chmod 755 $POLICY"
        trap 'as_root rm -f "$POLICY"' EXIT
        say "installed a temporary $POLICY so the package cannot start its service"
    else
        say "$POLICY exists already; left as is"
    fi

    # apt-get update only when the package lists do not know the package.
    candidate=$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
        say "package lists do not know prometheus: running apt-get update"
        as_root apt-get update -q || die "apt-get update failed"
    fi
    say "installing Debian's prometheus ${candidate:-} (--no-install-recommends)"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends prometheus; then
        # Stale lists (a 404 on a superseded .deb): refresh once and retry.
        say "install failed; running apt-get update and retrying once"
        as_root apt-get update -q || die "apt-get update failed"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends prometheus ||
            die "apt-get install prometheus failed"
    fi
    command -v prometheus >/dev/null || die "prometheus installed but not on PATH"
    say "installed: $(command -v prometheus) ($(prometheus --version 2>&1 | head -n1))"
fi

# --- no system service --------------------------------------------------------
# Only the package's own service is touched (run as user `prometheus` from the
# init script's pidfile or the systemd unit); Prometheus processes that tests or
# people started themselves are left alone.
pid1=$(ps -p 1 -o comm= 2>/dev/null || echo unknown)
if systemd_runs; then
    say "systemd is PID 1 ($pid1): stopping and disabling prometheus.service"
    if systemctl list-unit-files prometheus.service >/dev/null 2>&1; then
        as_root systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
    if systemctl is-active --quiet prometheus.service; then
        die "prometheus.service is still active; stop it with: systemctl stop prometheus"
    fi
    say "prometheus.service: $(systemctl is-enabled prometheus.service 2>/dev/null || echo absent), $(systemctl is-active prometheus.service 2>/dev/null || true)"
else
    say "systemd is not running (PID 1 is $pid1): checking the sysvinit service"
    if [ -x /etc/init.d/prometheus ]; then
        # Not started at boot (there is no boot here, but keep it that way).
        as_root update-rc.d prometheus disable >/dev/null 2>&1 || true
        if as_root /etc/init.d/prometheus status >/dev/null 2>&1; then
            say "the package's prometheus service is running: stopping it"
            as_root /etc/init.d/prometheus stop || die "could not stop /etc/init.d/prometheus"
        fi
        say "sysvinit service prometheus: disabled, not running"
    fi
    # The install enabled the systemd unit too (a symlink only, while systemd does
    # not run); disable it so a later systemd boot does not start it either.
    if [ -e /etc/systemd/system/multi-user.target.wants/prometheus.service ] &&
        command -v deb-systemd-helper >/dev/null; then
        as_root deb-systemd-helper disable prometheus.service >/dev/null 2>&1 || true
        say "systemd unit prometheus.service: disabled"
    fi
fi
# Belt and braces: a leftover daemon of the package runs as user `prometheus`.
if command -v pgrep >/dev/null && pgrep -u prometheus -x prometheus >/dev/null 2>&1; then
    die "a prometheus process of user 'prometheus' still runs (pids: $(pgrep -u prometheus -x prometheus | tr '\n' ' ')); stop it"
fi
if command -v ss >/dev/null && ss -Hltn 'sport = :9090' 2>/dev/null | grep -q .; then
    say "note: something else listens on port 9090 (the tests use their own free ports, so this is harmless)"
fi
say "ok: prometheus is installed and no system prometheus service runs"
