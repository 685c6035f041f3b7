#!/usr/bin/env bash
# Builds syncgate as an earlier release made it, from this clone's own
# history, for the mixed-release end-to-end case (tests/e2e): prints the
# binary's path. Releases are listed in CHANGELOG.md.
#   scripts/old-release.sh 0.1.0
# The release's source is exported (git archive) under target/releases/ and
# built with a target directory of its own there, so a second run reuses
# both; runs at the same time wait for each other.
set -euo pipefail
cd "$(dirname "$0")/.."

release=${1:?usage: scripts/old-release.sh RELEASE (e.g. 0.1.0)}
case "$release" in
    0.1.0) commit=658124e4807dd9997af6e44a3171834b04985168 ;;
    *) echo "error: unknown release '$release' (known: 0.1.0)" >&2; exit 2 ;;
esac

home="$PWD/target/releases/$release-${commit:0:12}"
bin="$home/syncgate"
mkdir -p "$home"
exec 9>"$home.lock"
flock 9
if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi

if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
        echo "== fetching this clone's history for release $release" >&2
        git fetch --quiet --unshallow >&2 || true
    fi
    if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
        echo "error: release $release (commit $commit) is not in this clone's history: clone without --depth" >&2
        exit 1
    fi
fi

src="$home/src"
rm -rf "$src"
mkdir -p "$src"
git archive "$commit" | tar -x -C "$src"
echo "== building release $release (commit ${commit:0:7})" >&2
(cd "$src" && CARGO_TARGET_DIR="$home/target" cargo build --quiet --locked --bin syncgate >&2)
cp "$home/target/debug/syncgate" "$bin.tmp"
mv "$bin.tmp" "$bin"
echo "$bin"
