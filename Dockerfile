# syntax=docker/dockerfile:1
# jetsaga's container image: a multi-stage build of every jetsaga binary into one slim runtime image.
#
#   docker build -t jetsaga:local .          (or: docker compose build)
#
# One image holds all five binaries (jetsaga-orchestrator, the `jetsaga` CLI, jetsaga-order,
# jetsaga-payment, jetsaga-inventory): they share one workspace, one dependency graph and one
# Cargo.lock, so one build compiles the dependencies once, the image layers are stored once, and
# every container of a deployment is guaranteed to run the same commit. Each compose service picks
# its binary with `command:`. The binaries are ~12 MB each (stripped, below): five of them in one
# image cost less than five images' base layers would.
#
# Dependency caching: cargo-chef turns the manifests and Cargo.lock into a recipe; the
# dependencies are compiled in their own layer from that recipe alone, so editing a .rs file only
# rebuilds the workspace crates.

# ---- toolchain + cargo-chef (pinned) ---------------------------------------------------------------
FROM rust:1.95.0-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /build

# ---- recipe: the dependency graph only ---------------------------------------------------------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---- build -------------------------------------------------------------------------------------------
FROM chef AS builder
COPY --from=planner /build/recipe.json recipe.json
# Dependencies only (the cached layer): rebuilt when a manifest or Cargo.lock changes.
RUN cargo chef cook --release --locked --recipe-path recipe.json \
      --package jetsaga-orchestrator --package jetsaga-participants
COPY . .
# The release profile keeps line tables (debug = 1): ~65-80 MB per binary. The image ships them
# without debug info, ~12 MB each (symbol names stay, so panics still name their functions);
# drop the `strip` to ship the line tables.
RUN cargo build --release --locked \
      --bin jetsaga-orchestrator \
      --bin jetsaga \
      --bin jetsaga-order \
      --bin jetsaga-payment \
      --bin jetsaga-inventory \
 && strip --strip-debug \
      target/release/jetsaga-orchestrator \
      target/release/jetsaga \
      target/release/jetsaga-order \
      target/release/jetsaga-payment \
      target/release/jetsaga-inventory

# ---- runtime -----------------------------------------------------------------------------------------
# Debian 12 (bookworm), the same release as the builder: the binaries link its glibc.
FROM debian:12.12-slim AS runtime
# ca-certificates: for TLS to NATS with public CAs. Versions are left to the pinned base image's
# security updates (pinning Debian package versions breaks the build at each point release).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# An unprivileged user; /data is where the participants keep their SQLite files (compose mounts
# one named volume per service there; an empty named volume takes this directory's ownership).
# No VOLUME instruction: the orchestrator and the CLI keep nothing on disk and should not get an
# anonymous volume each time they start.
RUN groupadd --system --gid 10001 jetsaga \
 && useradd --system --uid 10001 --gid jetsaga --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin jetsaga \
 && mkdir -p /data \
 && chown jetsaga:jetsaga /data
COPY --from=builder \
      /build/target/release/jetsaga-orchestrator \
      /build/target/release/jetsaga \
      /build/target/release/jetsaga-order \
      /build/target/release/jetsaga-payment \
      /build/target/release/jetsaga-inventory \
      /usr/local/bin/
# The participants' seed (JETSAGA_SEED) and the saga definitions (JETSAGA_DEFINITIONS).
COPY participants/seed/default.json /usr/share/jetsaga/seed/default.json
COPY orchestrator/definitions/ /usr/share/jetsaga/definitions/
USER 10001:10001
WORKDIR /data
# Metrics and health (JETSAGA_METRICS_ADDR, e.g. 0.0.0.0:9090).
EXPOSE 9090
CMD ["jetsaga-orchestrator"]
