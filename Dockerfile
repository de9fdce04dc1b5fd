# syntax=docker/dockerfile:1
# The operator image: built from source, shipped as the single static-ish binary on a distroless
# base (glibc and CA certificates only, no shell, no package manager), running as a non-root user.
#
#   docker build -t ghcr.io/mailpoll/mailpoll:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#
# The base images are pinned to exact releases: the toolchain to a Rust patch version, the
# runtime to distroless' Debian 12 line. For a reproducible image, add each one's digest
# (`docker buildx imagetools inspect <image>`) as @sha256:… and let a dependency bot bump it.

ARG RUST_IMAGE=rust:1.95.0-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build artefacts between builds; the binary is copied out of
# the cached target directory because cache mounts are not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package mailpoll --bin mailpoll \
    && install -D -m 0755 target/release/mailpoll /out/mailpoll

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mailpoll" \
      org.opencontainers.image.description="Kubernetes operator that delivers every email of a Microsoft 365 mailbox once" \
      org.opencontainers.image.source="https://github.com/mailpoll/mailpoll" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder /out/mailpoll /usr/local/bin/mailpoll
# 65532 is distroless' "nonroot"; numeric so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/mailpoll"]
CMD ["operator"]
