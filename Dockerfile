# syntax=docker/dockerfile:1
# The operator image: the same release binary CI builds (scripts/check-dockerfile.sh runs the
# `cargo build` line below verbatim and checks the result), on a distroless non-root runtime.
#
# Target x86_64-unknown-linux-gnu, not musl: the binary needs only glibc and libgcc (TLS is
# rustls, no OpenSSL), which gcr.io/distroless/cc-debian12 ships; the builder is Debian 12 too, so
# the binary never asks for a newer glibc than the runtime has. musl would also allow a `static`
# base, but its default allocator is markedly slower for this async, allocation-heavy workload,
# and the musl target is not installed where CI builds (a toolchain cannot be downloaded there).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The target dir is a cache mount, so the binary is copied out within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin acs-identity-operator --target x86_64-unknown-linux-gnu \
    && cp target/x86_64-unknown-linux-gnu/release/acs-identity-operator /acs-identity-operator

# No shell, no package manager: the binary, glibc, libgcc and CA certificates.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /acs-identity-operator /acs-identity-operator
USER 65532:65532
ENTRYPOINT ["/acs-identity-operator", "run"]
