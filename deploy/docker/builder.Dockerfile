# The builder make-images.sh assembles where no Rust image can be pulled: the local
# build base, this host's toolchain, and Cargo.lock's crates vendored so that the build
# needs no network. Laid out like the public rust images (CARGO_HOME, PATH), so the
# top-level Dockerfile works the same with either.
FROM servant-base/build:bookworm
COPY rust /usr/local/rust
COPY vendor /usr/local/cargo/vendor
COPY config.toml /usr/local/cargo/config.toml
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN rustc --version && cargo --version
