# syncgate: one static-enough binary on a small base, run as a non-root user.
#
#   docker build -t syncgate .
#   docker run --rm syncgate --help
#
# Ports (all configurable): 5000 the central proxy, 4222 the embedded broker,
# 9090 central's admin API (audit, /healthz, /readyz, /metrics), 9091 an edge's.
# Volume: /var/lib/syncgate holds the op log (central) or the edge's state; the
# default database URLs are relative to it.
#
# The base images are build arguments so that a registry mirror, or images made
# locally (the project's CI builds them from Debian packages), can stand in.
ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
RUN cargo build --release --locked --bin syncgate \
    && cp target/release/syncgate /usr/local/bin/syncgate \
    && /usr/local/bin/syncgate --version \
    && mkdir -p /state/var/lib/syncgate

FROM ${RUNTIME_IMAGE}
COPY --from=build /usr/local/bin/syncgate /usr/local/bin/syncgate
# The state directory belongs to the user the process runs as (a volume mounted
# there starts with this owner).
COPY --from=build --chown=65532:65532 /state/ /
# distroless's "nonroot" user; a number, so that no passwd entry is needed.
USER 65532:65532
WORKDIR /var/lib/syncgate
VOLUME ["/var/lib/syncgate"]
EXPOSE 5000 4222 9090 9091
# The binary is PID 1 and handles SIGTERM itself (a graceful drain within
# --shutdown-grace); no init process is needed.
STOPSIGNAL SIGTERM
# Probes the admin listener named by SYNCGATE_ADMIN_LISTEN (else :9090, :9091).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/syncgate", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/syncgate"]
CMD ["--help"]
