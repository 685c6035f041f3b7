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
