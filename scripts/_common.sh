# Shared by scripts/serve, scripts/test and .ci/run; sourced, never run.
# Expects the caller to have cd'ed to the repository root.

VENV=.venv

log() {
    printf '==> %s\n' "$*" >&2
}

is_ci() {
    case "${CI:-}" in
        true | TRUE | True | 1 | yes) return 0 ;;
        *) return 1 ;;
    esac
}

# Run a command as root: directly, or through sudo (which may ask for a
# password when there is a terminal).  Fails when neither is possible.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        if [ -t 0 ]; then sudo "$@"; else sudo -n "$@"; fi
    else
        return 1
    fi
}

# Print the Debian packages among "$@" that are not installed.
missing_debs() {
    local package
    for package in "$@"; do
        if ! dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q ' installed$'; then
            echo "$package"
        fi
    done
}

# Install the Debian packages among "$@" that are missing; fail when that
# is impossible (not Debian, not root and no sudo) or apt-get fails.
apt_install() {
    command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 || return 1
    [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1 || return 1
    local missing
    missing=$(missing_debs "$@")
    [ -n "$missing" ] || return 0
    log "installing Debian packages:" $missing
    # shellcheck disable=SC2086 # one word per package
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
}

# A python3 of version 3.11 or later: $PYTHON, else the first found.
find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# Create .venv, or reuse it when it works.
ensure_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        return 0
    fi
    local python version
    if ! python=$(find_python); then
        log "nattraverse needs Python 3.11 or later as python3 (or set PYTHON=/path/to/python3.x)"
        exit 1
    fi
    log "creating $VENV with $python"
    if ! "$python" -m venv --clear "$VENV" >/dev/null 2>&1; then
        # Debian and Ubuntu ship venv/ensurepip separately.
        version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        if ! apt_install "python$version-venv"; then
            log "cannot create $VENV: install python$version-venv (apt-get install python$version-venv)"
            exit 1
        fi
        "$python" -m venv --clear "$VENV"
    fi
}

# pip install "$@" into .venv (a regular, not editable, install: Twisted's
# plugin discovery under twisted/plugins/ needs real files).
venv_install() {
    # setuptools reuses build/lib, where files removed from the source live on.
    rm -rf build
    log "installing $* into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
}
