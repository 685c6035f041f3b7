#!/usr/bin/env bash
# Benchmarks, all of them: reads and captured writes through the gateway side by
# side with nginx, an edge's catch-up and the replication lag (scripts/bench.py),
# then the embedded broker against nats-server (scripts/bench-broker.sh;
# BENCH_BROKER=0 skips it). Installs wrk and nginx with apt-get when missing (as
# root). Prints figures; never fails on a timing. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_debian_packages wrk nginx

cargo build --release --locked --quiet --bin syncgate
python3 scripts/bench.py "$@"
if [ "${BENCH_BROKER:-1}" != 0 ]; then
    scripts/bench-broker.sh
fi
