# syntax=docker/dockerfile:1.7
# The `tandem-operator` image: a static-enough binary on distroless, non-root (nonroot = 65532),
# matching the chart's restricted securityContext. Build from the repo root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/tandem-dev/tandem-operator:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY worker worker
COPY operator operator
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tandem-operator --bin tandem-operator \
 && cp target/release/tandem-operator /tandem-operator

# cc variant: glibc + libgcc, which the Rust binary links; TLS is rustls, no OpenSSL.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /tandem-operator /usr/local/bin/tandem-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tandem-operator"]
