# The omoi binary: one image for the coordinator and the workers.
#
# Build stage: everything the compiler reads — the manifest, the build script, the sources, the
# migrations and the files the binary embeds (nats/jetstream.yaml, docs/openapi.json,
# patterns/*.yaml).
# tests/integration/repo.rs checks that every file the build reads is copied.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY migrations ./migrations
COPY nats ./nats
COPY docs ./docs
COPY patterns ./patterns
RUN cargo build --release --locked --bin omoi

# Runtime: slim Debian, CA certificates and the binary, run by a user without privileges.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/omoi omoi
COPY --from=build /src/target/release/omoi /usr/local/bin/omoi
USER omoi
WORKDIR /var/lib/omoi
EXPOSE 8080
ENTRYPOINT ["omoi"]
CMD ["coordinator"]
