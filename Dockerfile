# callout container image.
#
#   docker build -t callout:dev .
#   docker run --rm --read-only callout:dev config print --config /etc/callout/callout.toml
#
# The build needs cargo alone: build.rs compiles the proto with protox (no protoc), and TLS is
# rustls with bundled webpki roots (no OpenSSL). The runtime image is distroless: no shell, no
# package manager, a non-root user, nothing written to the root filesystem.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin callout \
 && install -D -m 0755 target/release/callout /out/callout

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/callout /usr/local/bin/callout
# The defaults (gRPC and metrics on loopback, private networks denied). Kubernetes mounts its
# own callout.toml over this file from a ConfigMap; see deploy/. Loopback on purpose: callout
# sends HTTP requests for whoever calls it, so an image that listened on every address with no
# token would be an open relay on whatever network it lands on. Reach it from outside the
# container by choosing both, e.g.
#   docker run -e CALLOUT_SERVER__LISTEN=0.0.0.0:50051 #     -e CALLOUT_SERVER__AUTH_TOKEN_FILE=/run/secrets/token -v "$PWD/token:/run/secrets/token:ro" #     -p 50051:50051 callout:dev
COPY callout.example.toml /etc/callout/callout.toml
# distroless's "nonroot" user and group (65532). callout writes nothing to disk except a Unix
# socket, when one is configured, in a mounted directory.
USER 65532:65532
# gRPC, then Prometheus metrics (/metrics).
EXPOSE 50051 9464
ENTRYPOINT ["callout"]
CMD ["serve", "--config", "/etc/callout/callout.toml"]
