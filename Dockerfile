# The nexus binary in a small image. Build from the repository root:
#   docker build -t nexus:local .
# The build needs crates.io; the image needs only glibc and CA certificates.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p nexus-cli

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/nexus /usr/local/bin/nexus
# A numeric non-root user (Kubernetes' runAsNonRoot can check it).
USER 65532:65532
ENTRYPOINT ["nexus"]
