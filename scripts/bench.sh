#!/usr/bin/env bash
# Benchmarks, all of them: reads (a small list and a 40 KiB token validation) and
# captured writes through the gateway side by side with nginx, an edge's catch-up and the replication lag (scripts/bench.py),
# then the embedded broker against nats-server (scripts/bench-broker.sh;
# BENCH_BROKER=0 skips it), the audit API's queries with a thousand edges and
# retention under captured writes (cargo bench --bench oplog; BENCH_OPLOG=0
# skips it), then a fleet of real edge processes on one central
# (scripts/bench-fleet.py; BENCH_FLEET=0 skips it, BENCH_FLEET_EDGES=N sets
# its size, 1,000 by default, about 6 MiB of memory each). Captured writes
# are measured again with the op log on a private PostgreSQL server (fsync and
# synchronous_commit on; BENCH_POSTGRES=0 skips it). Installs wrk, nginx and postgresql with apt-get
# when missing (as root). Prints figures; never fails on a timing. See
# BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_debian_packages wrk nginx

cargo build --release --locked --quiet --bin syncgate
pg=()
if [ "${BENCH_POSTGRES:-1}" != 0 ] && ensure_postgresql && start_test_postgres durable; then
    trap stop_test_postgres EXIT
    port="${SYNCGATE_TEST_POSTGRES##*:}"
    "${TEST_PG_AS[@]}" "$TEST_PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U syncgate bench
    pg=(--postgres "$SYNCGATE_TEST_POSTGRES/bench")
    BENCH_POSTGRES_VERSION="$("$TEST_PG_BIN/postgres" --version | awk '{print $3}')"
    export BENCH_POSTGRES_VERSION
fi
python3 scripts/bench.py "${pg[@]}" "$@"
if [ "${BENCH_BROKER:-1}" != 0 ]; then
    scripts/bench-broker.sh
fi
if [ "${BENCH_OPLOG:-1}" != 0 ]; then
    cargo bench --locked --quiet --bench oplog
fi
if [ "${BENCH_FLEET:-1}" != 0 ]; then
    python3 scripts/bench-fleet.py --edges "${BENCH_FLEET_EDGES:-1000}"
fi
