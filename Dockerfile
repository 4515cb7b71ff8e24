# rotator's container image: built with the locked dependencies, run as a
# non-root user from a distroless base. The binary links glibc (aws-lc-rs,
# bundled SQLite), so the runtime base is distroless "cc" (glibc, libgcc,
# CA certificates, /etc/passwd with nonroot = 65532), not "static".
#
#   docker build -t rotator .
#   docker run --rm rotator --help
#
# deploy/check.sh lints this file with hadolint; no Docker engine runs in CI,
# so the build itself is not run there.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# --locked: exactly the versions in Cargo.lock, or the build fails.
RUN cargo build --release --locked --bin rotator \
 && install -D -m 0755 target/release/rotator /out/rotator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/rotator /usr/local/bin/rotator
# distroless's nonroot user, as deploy/base/deployment.yaml runs it.
USER 65532:65532
EXPOSE 8443 9464
ENTRYPOINT ["/usr/local/bin/rotator"]
CMD ["serve", "--log-format", "json"]
