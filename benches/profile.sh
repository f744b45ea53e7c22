#!/usr/bin/env bash
# Where lb's CPU goes at a fixed rate: user vs system time, context switches per query, and a
# kernel+user profile (perf record -e cpu-clock, which works without hardware counters).
#
# Usage: benches/profile.sh [QPS] [SECS] [WORKERS]     (defaults 20000 10 2; run as root)
# Leaves perf.data and perf-report.txt in $BENCH_WORK (kept when BENCH_KEEP=1).
source "$(dirname "$0")/common.sh"
QPS="${1:-20000}"
SECS="${2:-10}"
WORKERS="${3:-2}"
need nsd dnsperf dnsutils linux-perf
build_lb
write_queries "$WORK/queries.txt"
start_nsd 127.0.0.11 1
start_nsd 127.0.0.12 1
start_lb 5300 "$WORKERS" 127.0.0.11:53 127.0.0.12:53
sleep 1.5

read -r u0 s0 < <(awk '{ print $14, $15 }' "/proc/$LB_PID/stat")
read -r v0 n0 < <(ctx_switches "$LB_PID")
perf record -q -e cpu-clock -F 4999 -g -p "$LB_PID" -o "$WORK/perf.data" -- sleep "$((SECS - 2))" >/dev/null 2>&1 &
PERF_PID=$!
rate=()
[ "$QPS" != max ] && rate=(-Q "$QPS")
out=$(run_dnsperf 5300 -l "$SECS" "${rate[@]}")
wait "$PERF_PID" || true
read -r u1 s1 < <(awk '{ print $14, $15 }' "/proc/$LB_PID/stat")
read -r v1 n1 < <(ctx_switches "$LB_PID")
done=$(dnsperf_field "$out" "Queries completed")
HZ=$(getconf CLK_TCK)
perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null | grep -v '^$' | grep -E '^ +[0-9]' | head -40 | tee "$WORK/perf-report.txt" || true
# The summary comes last, below the profile.
echo "$out" | grep -E "Queries lost|Average Latency"
awk -v u="$((u1 - u0))" -v s="$((s1 - s0))" -v v="$((v1 - v0))" -v n="$((n1 - n0))" -v q="$done" -v hz="$HZ" 'BEGIN {
  printf "queries %d: user %.2f + system %.2f = %.2f us/query; context switches %.2f voluntary + %.3f involuntary per query\n",
    q, u / hz / q * 1e6, s / hz / q * 1e6, (u + s) / hz / q * 1e6, v / q, n / q }'
