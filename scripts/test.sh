#!/usr/bin/env bash
# The test command: installs what the tests need (apt and pip, see install-deps.sh), builds
# the binaries and their Debian packages, runs every test (unit and integration, real
# BIND/lb/ansible/Prometheus on loopback; the package tests install and purge the lb package).
# Among them, lb/tests/layers.rs fails when a module of lb/src imports from a higher layer
# (the table in lb/src/lib.rs) or across the two planes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
# --examples: the rehearsal test (tests/integration/machines.rs) runs scripts/demo.sh, whose
# load generator is an example.
cargo build --workspace --bins --examples
# The fuzz targets are not in the workspace (cargo-fuzz wants nightly); check that they still
# build against lb's API with the stable toolchain, so they cannot rot.
cargo check --locked --manifest-path fuzz/Cargo.toml
# The Debian packages of that debug build, for the package tests (tests/integration/ops.rs);
# installs cargo-deb the first time.
scripts/package.sh --profile dev --no-build --fast --output target/debian-test >/dev/null
cargo test --workspace -- --test-threads="${TEST_THREADS:-4}"
