#!/usr/bin/env bash
# Runs syncgate's test suite:
#   1. the Rust tests (cargo nextest when installed, cargo test otherwise);
#   2. the nats-py client against the embedded broker, in a Python venv
#      (.venv, created and filled from tests/python/requirements.txt when missing
#      or out of date).
# Extra arguments go to the Rust test runner.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/venv.sh
source scripts/venv.sh

status=0
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast "$@" || status=$?
else
    cargo test --no-fail-fast "$@" || status=$?
fi

echo "== nats-py against the embedded broker"
ensure_venv
cargo build --quiet --bin syncgate
.venv/bin/python tests/python/broker_nats_py.py target/debug/syncgate || status=$?

exit "$status"
