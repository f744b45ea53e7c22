#!/usr/bin/env bash
# Benchmark for the control-socket issue: an atomic backend swap under a fixed dnsperf load.
#
# Four NSD backends on loopback: A,B (127.0.0.11/12) serve serial 1, C,D (127.0.0.13/14)
# serial 2. lb fronts A,B; dnsperf sends QPS queries/s for SECONDS s; halfway, `lb ctl
# set-backends [--verify] C D` runs and A,B are killed the moment it returns. Reports queries
# sent/completed/lost, the swap command's latency, and the serial served afterwards.
#
# Usage: benches/swap.sh [QPS] [SECONDS]     (defaults 20000 and 20; run as root)
source "$(dirname "$0")/common.sh"
QPS="${1:-20000}"
SECS="${2:-20}"
need nsd dnsperf dnsutils
build_lb
write_queries "$WORK/queries.txt"

run_once() {
  local verify="$1"
  start_nsd 127.0.0.11 1; local a=$NSD_PID
  start_nsd 127.0.0.12 1; local b=$NSD_PID
  start_nsd 127.0.0.13 2
  start_nsd 127.0.0.14 2
  start_lb 5300 2 127.0.0.11:53 127.0.0.12:53
  run_dnsperf 5300 -Q "$QPS" -l "$SECS" >"$WORK/perf.out" &
  local perf=$!
  sleep "$((SECS / 2))"
  local t0 t1
  t0=$(date +%s%N)
  "$LB" ctl --json --socket "$LB_SOCK" set-backends $verify 127.0.0.13:53 127.0.0.14:53 >"$WORK/ctl.json"
  t1=$(date +%s%N)
  kill -9 "$a" "$b"
  local swap_ms
  swap_ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e6 }')
  local server_ms
  server_ms=$(sed -n 's/.*"elapsed_us":\([0-9]*\).*/\1/p' "$WORK/ctl.json" | awk '{ printf "%.3f", $1 / 1000 }')
  wait "$perf" || true
  local out serial
  out=$(cat "$WORK/perf.out")
  serial=$(dig +short +norec -p 5300 @127.0.0.1 example.test SOA | awk '{ print $3 }')
  local sent done lost
  sent=$(dnsperf_field "$out" "Queries sent")
  done=$(dnsperf_field "$out" "Queries completed")
  lost=$(dnsperf_field "$out" "Queries lost")
  echo "| set-backends ${verify:-(plain)} | $QPS | $SECS | $sent | $done | $lost | $server_ms | $swap_ms | $serial |"
  kill "$LB_PID" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  PIDS=()
  sleep 0.5
}

echo "| command | qps | seconds | sent | completed | lost | swap in lb (ms) | lb ctl wall time (ms) | serial after |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
run_once ""
run_once "--verify"
