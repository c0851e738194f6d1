# Sourced by the set-up scripts: messages, root, and installing Debian packages whose
# programs are missing. Set SETUP_NAME before sourcing it.
SETUP_NAME=${SETUP_NAME:-setup}

say() { echo "$SETUP_NAME: $*"; }
die() {
    echo "$SETUP_NAME: ERROR: $*" >&2
    exit 1
}

# Root (or sudo) is needed only to install: scripts that find everything present run
# as any user.
SUDO=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
    SUDO=(sudo)
fi
as_root() {
    if [ "$(id -u)" -ne 0 ] && [ "${#SUDO[@]}" -eq 0 ]; then
        die "must run as root (or with sudo installed) to run: $*"
    fi
    "${SUDO[@]}" "$@"
}

# install_missing PACKAGE:PROGRAM ...: installs each package whose program is not found
# (on PATH or in /usr/sbin, /sbin), in one apt-get run.
install_missing() {
    local pair pkg prog missing=()
    for pair in "$@"; do
        pkg="${pair%%:*}"
        prog="${pair##*:}"
        if command -v "$prog" >/dev/null || [ -x "/usr/sbin/$prog" ] || [ -x "/sbin/$prog" ]; then
            say "$pkg present ($prog)"
        else
            missing+=("$pkg")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and apt-get is not available (not Debian?)"
    say "installing ${missing[*]}"
    as_root apt-get update -q || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" || die "apt-get install ${missing[*]} failed"
}
