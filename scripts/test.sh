#!/usr/bin/env bash
# The test command: installs what the tests need, builds the binaries, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --workspace --bins
cargo test --workspace -- --test-threads="${TEST_THREADS:-4}"
