#!/bin/sh
# Routes through the LAN's router, then runs servant unprivileged (see lan-peer.Dockerfile).
set -eu
: "${GATEWAY:?GATEWAY must name this LAN's router}"
ip route replace default via "$GATEWAY"
exec setpriv --reuid=10001 --regid=10001 --clear-groups --inh-caps=-all --bounding-set=-all \
    -- servant "$@"
