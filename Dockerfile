# Servant's container image: a release build in a Rust image, run from a small Debian
# image as a non-root user with its state in /data.
#
#   docker build -t servant .
#   docker run -d --name servant -p 4001:4001/tcp -p 4001:4001/udp -v servant-data:/data servant
#
# The base images are build arguments. Where no registry can be reached,
# deploy/docker/make-images.sh makes local ones (debootstrap, and a builder carrying
# the host's toolchain with vendored crates) and prints the --build-arg flags to use.
ARG BUILDER_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
# Dependencies first, against empty crates: this layer is reused until a manifest or
# Cargo.lock changes, so a source change rebuilds only Servant's own crates. The test
# crate is a workspace member, so it stays as an empty stub; it is never built here.
COPY Cargo.toml Cargo.lock ./
COPY protocol/Cargo.toml protocol/
COPY node/Cargo.toml node/
COPY tests/Cargo.toml tests/
RUN mkdir -p protocol/src node/src tests/src \
    && touch protocol/src/lib.rs node/src/lib.rs tests/src/lib.rs \
    && echo 'fn main() {}' > node/src/main.rs \
    && cargo build --release --locked -p servant \
    && rm -rf protocol/src node/src
COPY protocol protocol
COPY node node
# Newer than the stubs whatever times the build context carries, so cargo rebuilds them.
# The line tables stay (readable backtraces), compressed.
RUN find protocol node -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p servant \
    && install -m 0755 target/release/servant /usr/local/bin/servant \
    && objcopy --compress-debug-sections=zlib /usr/local/bin/servant

FROM ${RUNTIME_IMAGE}
RUN groupadd --system --gid 10001 servant \
    && useradd --system --uid 10001 --gid servant --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin servant \
    && mkdir -p /data \
    && chown servant:servant /data \
    && chmod 0700 /data
COPY --from=build /usr/local/bin/servant /usr/local/bin/servant
# Every config key is also a SERVANT_* variable; these are the container's defaults.
# The API listens on every interface so that Prometheus and probes reach it; /v1/ then
# needs the bearer token (SERVANT_API_TOKEN, or the one generated in /data/api.token).
ENV SERVANT_DATA_DIR=/data \
    SERVANT_API=0.0.0.0:5100 \
    SERVANT_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 4001/tcp 4001/udp 5100/tcp
USER servant
WORKDIR /data
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["servant", "health"]
ENTRYPOINT ["servant"]
CMD ["run"]
