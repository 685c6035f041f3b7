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

# ensure_keystone_venv RELEASE makes .venv-keystone-RELEASE hold an older
# Keystone release (for the mixed-release end-to-end checks: an edge site on
# it) with exactly the packages pinned in tests/python/keystone-RELEASE.txt,
# which were resolved for that release (its own era's libraries; today's
# may no longer work with it).
ensure_keystone_venv() {
    local release=$1
    local req=tests/python/keystone-$release.txt
    local dir=.venv-keystone-$release
    local stamp=$dir/.requirements
    [ -f "$req" ] || { echo "error: $req not found: no pinned set for Keystone $release" >&2; return 1; }
    if [ -x "$dir/bin/keystone-manage" ] && [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
        return 0
    fi
    echo "== preparing $dir from $req"
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$req"
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

# Starts a private PostgreSQL server for the tests that run central's op log on
# PostgreSQL (each makes a database of its own on it): in a temporary
# directory, on a free loopback port, as nobody when run as root (PostgreSQL
# refuses root), without fsync (what is tested is syncgate's SQL, not the
# server's durability; `start_test_postgres durable` keeps fsync on, as the
# benchmarks measure it). Exports SYNCGATE_TEST_POSTGRES; stop_test_postgres
# stops it and removes its files.
start_test_postgres() {
    local bin port fsync="-c fsync=off"
    [ "${1:-}" = durable ] && fsync=""
    bin="${SYNCGATE_POSTGRES_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
    [ -x "$bin/initdb" ] || { echo "error: PostgreSQL's initdb not found" >&2; return 1; }
    TEST_PG_DIR="$(mktemp -d)" || return 1
    TEST_PG_AS=()
    if [ "$(id -u)" -eq 0 ]; then
        chown nobody "$TEST_PG_DIR" || { stop_test_postgres; return 1; }
        TEST_PG_AS=(runuser -u nobody --)
    fi
    TEST_PG_BIN="$bin"
    "${TEST_PG_AS[@]}" "$bin/initdb" -D "$TEST_PG_DIR/data" -U syncgate --auth=trust --no-sync \
        --locale=C -E UTF8 >"$TEST_PG_DIR/initdb.log" 2>&1 \
        || { cat "$TEST_PG_DIR/initdb.log" >&2; stop_test_postgres; return 1; }
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    "${TEST_PG_AS[@]}" "$bin/pg_ctl" -D "$TEST_PG_DIR/data" -l "$TEST_PG_DIR/server.log" -w \
        -o "-p $port -k $TEST_PG_DIR -c listen_addresses=127.0.0.1 $fsync -c max_connections=400" \
        start >/dev/null || { cat "$TEST_PG_DIR/server.log" >&2; stop_test_postgres; return 1; }
    export SYNCGATE_TEST_POSTGRES="postgres://syncgate@127.0.0.1:$port"
}

stop_test_postgres() {
    [ -n "${TEST_PG_DIR:-}" ] || return 0
    "${TEST_PG_AS[@]}" "$TEST_PG_BIN/pg_ctl" -D "$TEST_PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$TEST_PG_DIR"
    TEST_PG_DIR=""
}
