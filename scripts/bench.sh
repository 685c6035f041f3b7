#!/usr/bin/env bash
# Benchmarks: reads and captured writes through the gateway side by side with
# nginx (scripts/bench.py; the broker has its own, scripts/bench-broker.sh).
# Installs wrk and nginx with apt-get when missing (as root). Prints figures;
# never fails on a timing. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_debian_packages wrk nginx

cargo build --release --locked --quiet --bin syncgate
python3 scripts/bench.py "$@"
