#!/usr/bin/env bash
# Starts a local syncgate deployment: two real Keystones (central and edge, from
# PyPI, in .venv), syncgate central in front of one and syncgate edge in front of
# the other; runs a short scenario through the gateway with the openstack CLI,
# prints the audit view, and keeps everything running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv
cargo build --quiet --bin syncgate
export SYNCGATE_BIN="$PWD/target/debug/syncgate"
exec .venv/bin/python tests/e2e/demo.py "$@"
