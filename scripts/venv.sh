# Sourced by the scripts: ensure_venv makes .venv hold exactly the pinned
# packages of tests/python/requirements.txt, reusing it when it already does.

ensure_venv() {
    local req=tests/python/requirements.txt
    local stamp=.venv/.requirements
    if [ -x .venv/bin/python ] && [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
        return 0
    fi
    echo "== preparing .venv from $req"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r "$req"
    cp "$req" "$stamp"
}

# Installs the Debian packages named when any of their commands is missing
# (as root, with apt-get); says what to install otherwise.
ensure_debian_packages() {
    local missing=()
    for pkg in "$@"; do
        command -v "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing ${missing[*]} (apt-get)"
        apt-get update -qq >/dev/null && \
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null && return 0
    fi
    echo "error: the tests need ${missing[*]}: install them (Debian: apt-get install ${missing[*]})" >&2
    return 1
}

# Installs PostgreSQL's server programs (Debian's postgresql) when none are
# there; the tests start a server of their own with them.
ensure_postgresql() {
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
    [ -n "${SYNCGATE_POSTGRES_BIN:-}" ] && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing postgresql (apt-get)"
        apt-get update -qq >/dev/null && \
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null && return 0
    fi
    echo "error: the tests need PostgreSQL's server (Debian: apt-get install postgresql)" >&2
    return 1
}
