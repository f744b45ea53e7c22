#!/usr/bin/env bash
# The test command: installs what the tests need (apt and pip, see install-deps.sh), builds
# the binaries, runs every test (unit and integration, real BIND/lb/ansible on loopback).
# Among them, lb/tests/layers.rs fails when a module of lb/src imports from a higher layer
# (the table in lb/src/lib.rs) or across the two planes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo build --workspace --bins
# The fuzz targets are not in the workspace (cargo-fuzz wants nightly); check that they still
# build against lb's API with the stable toolchain, so they cannot rot.
cargo check --locked --manifest-path fuzz/Cargo.toml
cargo test --workspace -- --test-threads="${TEST_THREADS:-4}"
