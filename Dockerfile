# syntax=docker/dockerfile:1
# The operator image: built from source, shipped as the single static-ish binary on a distroless
# base (glibc and CA certificates only, no shell, no package manager), running as a non-root user.
#
#   docker build -t ghcr.io/mailpoll/mailpoll:0.1.0 .

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build artefacts between builds; the binary is copied out of
# the cached target directory because cache mounts are not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package mailpoll --bin mailpoll \
    && install -D -m 0755 target/release/mailpoll /out/mailpoll

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/mailpoll /usr/local/bin/mailpoll
# 65532 is distroless' "nonroot"; numeric so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/mailpoll"]
CMD ["operator"]
