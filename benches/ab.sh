#!/usr/bin/env bash
# A/B comparison of two lb binaries on the same backends and load, in alternating order: for
# measuring one change at a time (the machine is too noisy for runs made minutes apart).
#
# Usage: benches/ab.sh BINARY_A BINARY_B [REPS] [SECS]      (defaults 5 and 10; run as root)
#        MODES="q20k q50k udp" LB_WORKERS=2 benches/ab.sh ...
#        EXTRA_B=$'[rrl]\nresponses_per_second = 1000000' benches/ab.sh lb lb   (one binary, two
#        configs: EXTRA_A / EXTRA_B are appended to each lb's config, BACKENDS_A / BACKENDS_B
#        go into its [backends] section)
# Prints, per binary and mode, medians of: qps, average latency (us), lost, CPU per answered
# query (us), context switches per query.
source "$(dirname "$0")/common.sh"
A="$1"
B="$2"
REPS="${3:-5}"
SECS="${4:-10}"
LB_WORKERS="${LB_WORKERS:-2}"
need nsd dnsperf dnsutils
write_queries "$WORK/queries.txt"
start_nsd 127.0.0.11 1
start_nsd 127.0.0.12 1
LB="$A" LB_EXTRA="${EXTRA_A:-}" LB_BACKENDS_EXTRA="${BACKENDS_A:-}" start_lb 5300 "$LB_WORKERS" 127.0.0.11:53 127.0.0.12:53
PID_A=$LB_PID
LB="$B" LB_EXTRA="${EXTRA_B:-}" LB_BACKENDS_EXTRA="${BACKENDS_B:-}" start_lb 5310 "$LB_WORKERS" 127.0.0.11:53 127.0.0.12:53
PID_B=$LB_PID
sleep 1.5
HZ=$(getconf CLK_TCK)
declare -A PORT=([a]=5300 [b]=5310) PID=([a]=$PID_A [b]=$PID_B)

switches() { ctx_switches "$1" | awk '{ print $1 + $2 }'; }

run() {
  local t="$1" mode="$2"
  shift 2
  local c0 s0 c1 s1 out
  c0=$(cpu_ticks "${PID[$t]}")
  s0=$(switches "${PID[$t]}")
  out=$(run_dnsperf "${PORT[$t]}" -l "$SECS" "$@")
  c1=$(cpu_ticks "${PID[$t]}")
  s1=$(switches "${PID[$t]}")
  local qps avg lost done
  qps=$(echo "$out" | awk '/Queries per second:/ { print $4 }')
  avg=$(echo "$out" | awk '/Average Latency/ { print $4 * 1e6 }')
  lost=$(dnsperf_field "$out" "Queries lost")
  done=$(dnsperf_field "$out" "Queries completed")
  awk -v q="$qps" -v a="$avg" -v l="$lost" -v c="$((c1 - c0))" -v s="$((s1 - s0))" -v n="$done" -v hz="$HZ" \
    'BEGIN { printf "%s %s %s %.2f %.3f\n", q, a, l, c / hz / n * 1e6, s / n }' >>"$WORK/ab-$t-$mode"
}

for r in $(seq 1 "$REPS"); do
  order="a b"
  [ $((r % 2)) -eq 0 ] && order="b a"
  for t in $order; do
    for m in ${MODES:-q20k q50k udp}; do
      case "$m" in
        udp) run "$t" udp ;;
        q20k) run "$t" q20k -Q 20000 ;;
        q50k) run "$t" q50k -Q 50000 ;;
      esac
    done
  done
  echo "rep $r done" >&2
done

median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
col() { awk -v c="$2" '{ print $c }' "$WORK/ab-$1" | median; }
echo "A = $A $(echo "${BACKENDS_A:-} ${EXTRA_A:-}" | tr '\n' ' '), B = $B $(echo "${BACKENDS_B:-} ${EXTRA_B:-}" | tr '\n' ' '); $(started_how); $REPS runs of ${SECS}s, alternating, medians"
echo
echo "| run | mode | qps | avg latency (us) | lost | CPU/query (us) | switches/query |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for m in ${MODES:-q20k q50k udp}; do
  for t in a b; do
    name="A"
    [ "$t" = b ] && name="B"
    echo "| $name | $m | $(col "$t-$m" 1 | awk '{ printf "%.0f", $1 }') | $(col "$t-$m" 2) | $(col "$t-$m" 3) | $(col "$t-$m" 4) | $(col "$t-$m" 5) |"
  done
done
