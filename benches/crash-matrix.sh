#!/usr/bin/env bash
# The full crash matrix of `deployer roll` (issue #17): every crash point, then `roll --resume`;
# every point before delete-old, then `rollback`; a lost reply on each lb (with and without a
# failure at verify); then every crash point again with the state directory deleted after the
# crash (issue #27: rebuilt from the world, then resumed or rolled back). Local provider, two
# lbs, two nameservers, steady load through both lbs.
# Writes the table to target/crash-matrix.md (or $CRASH_MATRIX_OUT; copy it into
# benches/RESULTS.md). Takes ~11 min on 2 vCPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
nice -n 10 cargo build --workspace --bins
out="${CRASH_MATRIX_OUT:-$PWD/target/crash-matrix.md}"
start=$(date +%s)
CRASH_MATRIX=full CRASH_MATRIX_OUT="$out" nice -n 10 cargo test -p integration-tests --test integration \
  deploy::crash_matrix -- --nocapture --test-threads=1 2>&1 | grep -E "crash matrix:|state-dir matrix:|test result|panicked|FAILED"
echo "crash matrix: $(($(date +%s) - start)) s; table in $out"
