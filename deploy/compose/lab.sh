#!/usr/bin/env bash
# Drives the compose lab (docker-compose.yml beside this script) with docker-compose 1.29.
#
#   lab.sh build     make the base images where none can be pulled, then servant:local
#                    (the top-level Dockerfile) and servant-lan-peer:local
#   lab.sh up        identity keys for the bootnode and super1 (their /p2p/ ids are the
#                    bootnode addresses), an API token, then docker-compose up -d
#   lab.sh down      stop and remove containers, networks and volumes (keys are kept)
#   lab.sh compose … any docker-compose command with the lab's project, file and env
#
# Environment: COMPOSE_PROJECT_NAME (servant-lab), SERVANT_LAB_STATE (deploy/compose/.lab:
# keys and the env file), SERVANT_PULL=1 to build from the Dockerfile's public base images
# instead of locally made ones.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-servant-lab}
export SERVANT_LAB_STATE=${SERVANT_LAB_STATE:-$here/.lab}
image=${SERVANT_IMAGE:-servant:local}
env_file="$SERVANT_LAB_STATE/env"

say() { echo "lab.sh: $*" >&2; }
die() {
    echo "lab.sh: ERROR: $*" >&2
    exit 1
}

compose() {
    [ -f "$env_file" ] || die "no $env_file: run lab.sh up first"
    docker-compose --project-directory "$here" -f "$here/docker-compose.yml" \
        --env-file "$env_file" "$@"
}

build() {
    local args=()
    if [ "${SERVANT_PULL:-0}" != 1 ]; then
        # shellcheck disable=SC2207
        args=($(bash "$root/deploy/docker/make-images.sh" --print-build-args))
    fi
    say "building $image from the top-level Dockerfile"
    docker build "${args[@]}" -t "$image" "$root"
    say "building servant-lan-peer:local"
    docker build --build-arg SERVANT_IMAGE="$image" -t servant-lan-peer:local \
        -f "$here/lan-peer.Dockerfile" "$here"
}

# key NAME: generates NAME.key once (as the image's user, mode 0600) and prints its PeerId.
key() {
    local name=$1 keys="$SERVANT_LAB_STATE/keys"
    mkdir -p "$keys"
    chown 10001:10001 "$keys"
    if [ ! -f "$keys/$name.key" ]; then
        docker run --rm --user 10001:10001 -v "$keys:/keys" --entrypoint servant "$image" \
            key generate --out "/keys/$name.key" >/dev/null
    fi
    docker run --rm --user 10001:10001 -v "$keys:/keys" --entrypoint servant "$image" \
        id --identity-file "/keys/$name.key" --data-dir /tmp
}

up() {
    mkdir -p "$SERVANT_LAB_STATE"
    if [ ! -f "$env_file" ]; then
        local token
        token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
        {
            echo "BOOTNODE_ID=$(key bootnode)"
            echo "SUPER1_ID=$(key super1)"
            echo "SERVANT_API_TOKEN=$token"
            echo "SERVANT_IMAGE=$image"
        } >"$env_file.tmp"
        mv "$env_file.tmp" "$env_file"
        say "wrote $env_file"
    fi
    compose up -d "$@"
}

cmd=${1:-}
shift || true
case $cmd in
build) build ;;
up) up "$@" ;;
down) compose down -v --remove-orphans ;;
compose) compose "$@" ;;
*)
    sed -n '2,15p' "$0" >&2
    exit 2
    ;;
esac
