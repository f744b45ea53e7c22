#!/usr/bin/env bash
# The test command: installs what the tests need (apt and pip, see install-deps.sh), builds
# the binaries, runs every test (unit and integration, real BIND/lb/ansible on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo build --workspace --bins
cargo test --workspace -- --test-threads="${TEST_THREADS:-4}"
