# The omoi binary: one image for the coordinator and the workers.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY nats ./nats
RUN cargo build --release --locked --bin omoi

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/omoi /usr/local/bin/omoi
ENTRYPOINT ["omoi"]
CMD ["coordinator"]
