#!/usr/bin/env bash
# Runs syncgate's test suite. Uses cargo-nextest when it is installed (each test
# in its own process), plain `cargo test` otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast "$@"
else
    cargo test --no-fail-fast "$@"
fi
