# authd: multi-stage build. The builder compiles the release binary; the runtime image is
# Debian 12 (bookworm) slim with the binary, CA roots (for mqtts:// without --broker-ca)
# and a non-root user. State lives in the /data volume. Base images are pinned by release
# (Rust 1.95.0, Debian 12.15): move them on purpose.
#
#   docker build -t authd .
#   docker run --rm authd serve --help
#
# The default command expects a broker reachable as `mosquitto` (see docker-compose.yml).

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other member (the load generator): cargo reads its manifest, the image
# ships only authd.
COPY bench ./bench
RUN cargo build --release --locked --bin authd

FROM debian:12.15-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin authd \
 && install -d -o authd -g authd -m 0700 /data
COPY --from=build /src/target/release/authd /usr/local/bin/authd
USER authd
VOLUME /data
# Prometheus /metrics and /ready, when started with --metrics 0.0.0.0:9464.
EXPOSE 9464
ENTRYPOINT ["authd"]
CMD ["serve", "--broker", "mqtt://mosquitto:1883", "--data", "/data"]
