#!/usr/bin/env bash
# Makes, without any registry, the images the top-level Dockerfile and the compose lab
# build from. Where images can be pulled, none of this is needed: the Dockerfile's
# defaults (rust:…-bookworm, debian:bookworm-slim) work as they are.
#
#   servant-base/runtime:bookworm   Debian minbase from debootstrap: the runtime base
#   servant-base/net:bookworm       + iproute2, iptables, prometheus: routers, Prometheus,
#                                   and the LAN peers that must set their own route
#   servant-base/build:bookworm     + gcc, libc6-dev: the builder's base
#   servant-builder:local           the build base + this host's Rust toolchain and the
#                                   crates of Cargo.lock, vendored (builds offline)
#
# Idempotent: an image that exists is kept; the builder is re-made when Cargo.lock or
# the toolchain changes (its tag carries their hash). Needs root (debootstrap) and
# Docker. SERVANT_DEBIAN_MIRROR overrides the mirror.
#
# Usage: deploy/docker/make-images.sh [--print-build-args]
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
suite=bookworm
mirror=${SERVANT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${SERVANT_DEBOOTSTRAP_CACHE:-/var/cache/servant/debootstrap}

say() { echo "make-images.sh: $*" >&2; }
die() {
    echo "make-images.sh: ERROR: $*" >&2
    exit 1
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# debootstrap_image TAG [PACKAGE,...]: a minbase root file system, imported as TAG.
debootstrap_image() {
    local tag=$1 include=${2:-}
    if have_image "$tag"; then
        say "$tag present"
        return
    fi
    command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
    local dir
    dir=$(mktemp -d /var/tmp/servant-rootfs.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$dir'" RETURN
    mkdir -p "$cache"
    say "debootstrap $suite ${include:+(+ $include) }for $tag"
    local args=(--variant=minbase --cache-dir="$cache")
    [ -n "$include" ] && args+=(--include="$include")
    debootstrap "${args[@]}" "$suite" "$dir" "$mirror" >"$dir.log" 2>&1 ||
        { tail -n 30 "$dir.log" >&2; die "debootstrap failed for $tag"; }
    rm -f "$dir.log"
    # What an image does not need: package lists and caches, docs, locales.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/*
    tar -C "$dir" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$tag" >/dev/null
    say "$tag made ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
}

builder_image() {
    local toolchain rustc_version lock_hash tag
    rustc_version=$(rustc --version) || die "rustc is missing"
    toolchain=$(rustc --print sysroot)
    lock_hash=$( (cat "$root/Cargo.lock"; echo "$rustc_version") | sha256sum | cut -c1-12)
    tag="servant-builder:$lock_hash"
    if have_image "$tag"; then
        say "$tag present"
    else
        local ctx
        ctx=$(mktemp -d /var/tmp/servant-builder.XXXXXX)
        # shellcheck disable=SC2064
        trap "rm -rf '$ctx'" RETURN
        say "vendoring the crates of Cargo.lock"
        (cd "$root" && cargo vendor --quiet --locked --versioned-dirs "$ctx/vendor" >/dev/null) ||
            die "cargo vendor failed"
        say "copying the toolchain ($rustc_version)"
        mkdir -p "$ctx/rust"
        # The compiler, cargo and the x86_64 standard library; not docs or sources.
        cp -a "$toolchain/bin" "$toolchain/lib" "$ctx/rust/"
        rm -rf "$ctx/rust/lib/rustlib/src" "$ctx/rust/lib/rustlib/rustc-src"
        cat >"$ctx/config.toml" <<'EOF'
[source.crates-io]
replace-with = "vendored"

[source.vendored]
directory = "/usr/local/cargo/vendor"

[net]
offline = true
EOF
        cp "$here/builder.Dockerfile" "$ctx/Dockerfile"
        docker build -q -t "$tag" "$ctx" >/dev/null || die "building $tag failed"
        say "$tag made"
    fi
    docker tag "$tag" servant-builder:local
}

debootstrap_image servant-base/runtime:$suite
debootstrap_image servant-base/net:$suite iproute2,iptables,prometheus,procps
debootstrap_image servant-base/build:$suite gcc,libc6-dev
builder_image

if [ "${1:-}" = "--print-build-args" ]; then
    echo "--build-arg BUILDER_IMAGE=servant-builder:local --build-arg RUNTIME_IMAGE=servant-base/runtime:$suite"
fi
