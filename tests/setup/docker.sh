#!/usr/bin/env bash
# Installs what the container tests (tests/tests/compose.rs) need beyond Docker itself:
# debootstrap, with which deploy/docker/make-images.sh makes the base images where no
# registry can be reached. Docker Engine and docker-compose (v1, Debian's packages) are
# installed only when missing; the images are built by the test itself. Idempotent.
#
# Usage: tests/setup/docker.sh   (as root, or with sudo available)
set -euo pipefail

SETUP_NAME=docker.sh
# shellcheck source=tests/setup/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

install_missing debootstrap:debootstrap docker.io:docker docker-compose:docker-compose
if ! docker info >/dev/null 2>&1; then
    say "WARNING: the Docker daemon does not answer; the container tests will skip (or fail under CI=true)"
fi
