#!/usr/bin/env bash
# Hostile-traffic benchmark: runs the hostile suite (tests/integration/hostile.rs) against the
# release build of lb and prints, per attack, the well-behaved client's success ratio and lb's
# peak RSS. Every attack is bounded in rate (5,000 packets/s at most) and time (a few seconds)
# and comes from 127.0.0.5; everything started is stopped by the test harness.
#
# Usage: benches/hostile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo build --release -q -p lb
cargo build -q --workspace --bins
LB_BIN="$PWD/target/release/lb" cargo test -q -p integration-tests -- hostile:: --nocapture --test-threads 1 2>&1 |
  grep -E "^hostile|test result"
