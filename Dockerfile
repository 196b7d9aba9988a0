# tidemark's container image: `docker build -t REGISTRY/tidemark:VERSION .` (no image is
# published; deploy/kubernetes/sidecar.yaml names the one you push).
#
# Two stages: the build (Rust on Debian trixie) and a small runtime (trixie-slim) with the
# binary, the CA certificates S3 over TLS needs, and PostgreSQL's client programs. Base backups
# and restores run pg_dump and pg_restore, which must be at least as new as the server's major
# version: Debian trixie's postgresql-client-17 serves PostgreSQL 10 to 17 from Debian's own
# archive, with no third-party repository. For a PostgreSQL 18 server, install
# postgresql-client-18 from the PostgreSQL project's apt repository (PGDG) instead and set
# TIDEMARK_PG_BIN to /usr/lib/postgresql/18/bin.

FROM rust:1.94-slim-trixie AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tidemark \
    && strip target/release/tidemark

FROM debian:trixie-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates postgresql-client-17 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tidemark
COPY --from=build /src/target/release/tidemark /usr/local/bin/tidemark
# pg_dump and pg_restore straight from their folder (not through Debian's pg_wrapper).
ENV TIDEMARK_PG_BIN=/usr/lib/postgresql/17/bin
USER 10001:10001
# The metrics address (TIDEMARK_METRICS_ADDRESS=0.0.0.0:9898): /metrics, /healthz, /readyz.
EXPOSE 9898
ENTRYPOINT ["/usr/local/bin/tidemark"]
CMD ["--help"]
