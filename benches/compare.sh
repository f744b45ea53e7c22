#!/usr/bin/env bash
# Peer benchmark: lb against dnsdist and nginx stream (and NSD queried directly), same machine,
# same backends, same load, in alternating order; prints a markdown table of medians.
#
# Setup as in shared/reference/peers.md: two NSD backends (one worker, RRL off) on
# 127.0.0.11/12:53 serving the benchmark zone; dnsdist 2 listeners, no packet cache,
# leastOutstanding; nginx stream 2 workers reuseport; lb 2 UDP workers (LB_WORKERS),
# least-outstanding. Load: dnsperf -c 8 -T 1 -q 200 -t 2, query mix of peers.md.
#
# Measures per target: unthrottled UDP qps (-l SECS), average and max latency and lost queries
# at fixed 20k and 50k qps, CPU time of the proxy per answered query at those rates
# (utime+stime of every process of the proxy / queries completed), peak RSS (VmHWM summed over
# the proxy's processes), and TCP qps over 8 persistent connections with 20 queries pipelined
# on each (tests/examples/tcpload.rs; dnsperf's TCP mode does not pipeline enough to load a
# proxy).
#
# Usage: benches/compare.sh [REPS] [SECS]     (defaults 3 and 10; run as root; ~15 min)
#        TARGETS="lb" LB_WORKERS=1 benches/compare.sh   (lb alone, for the worker-scaling table)
#        MODES="tcp" benches/compare.sh                  (a subset of the measurements)
source "$(dirname "$0")/common.sh"
REPS="${1:-3}"
SECS="${2:-10}"
LB_WORKERS="${LB_WORKERS:-2}"
need nsd dnsperf dnsutils dnsdist nginx libnginx-mod-stream
build_lb
(cd "$ROOT" && cargo build --release -q -p integration-tests --example tcpload)
TCPLOAD="$ROOT/target/release/examples/tcpload"
write_queries "$WORK/queries.txt"
start_nsd 127.0.0.11 1
start_nsd 127.0.0.12 1
start_lb 5300 "$LB_WORKERS" 127.0.0.11:53 127.0.0.12:53
start_dnsdist 5301
start_nginx 5302
sleep 2 # first health checks

declare -A PORT=([direct]=53 [lb]=5300 [dnsdist]=5301 [nginx]=5302)
declare -A ADDR=([direct]=127.0.0.11 [lb]=127.0.0.1 [dnsdist]=127.0.0.1 [nginx]=127.0.0.1)

# PIDs of a target's processes (all threads are in the process; nginx has workers).
pids_of() {
  case "$1" in
    lb) echo "$LB_PID" ;;
    dnsdist) echo "$DNSDIST_PID" ;;
    nginx) echo "$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')" ;;
    direct) echo "" ;;
  esac
}
ticks_of() { local t=0; for p in $(pids_of "$1"); do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$t"; }
rss_of() { local r=0; for p in $(pids_of "$1"); do r=$((r + $(peak_rss_kb "$p"))); done; echo "$r"; }
HZ=$(getconf CLK_TCK)

# run TARGET MODE ARGS... -> appends "qps avg_us max_us lost cpu_us_per_query" to $WORK/res-TARGET-MODE
run() {
  local t="$1" mode="$2"
  shift 2
  local before after out
  before=$(ticks_of "$t")
  out=$(timeout $((SECS + 30)) dnsperf -s "${ADDR[$t]}" -p "${PORT[$t]}" -d "$WORK/queries.txt" -c 8 -T 1 -q 200 -t 2 -l "$SECS" "$@" 2>&1)
  after=$(ticks_of "$t")
  local qps avg max lost done
  qps=$(echo "$out" | awk '/Queries per second:/ { print $4 }')
  avg=$(echo "$out" | awk '/Average Latency/ { print $4 * 1e6 }')
  max=$(echo "$out" | awk '/Average Latency/ { gsub(/[(),]/, ""); print $8 * 1e6 }')
  lost=$(dnsperf_field "$out" "Queries lost")
  done=$(dnsperf_field "$out" "Queries completed")
  local cpu
  cpu=$(awk -v a="$before" -v b="$after" -v n="$done" -v hz="$HZ" 'BEGIN { if (n > 0) printf "%.2f", (b - a) / hz / n * 1e6; else print "nan" }')
  echo "$qps $avg $max $lost $cpu" >>"$WORK/res-$t-$mode"
}

# TARGETS restricts the run (e.g. TARGETS=lb LB_WORKERS=1 for the scaling table).
read -r -a targets <<<"${TARGETS:-lb dnsdist nginx direct}"
for r in $(seq 1 "$REPS"); do
  # Alternate the order between repetitions.
  order=("${targets[@]}")
  if [ $((r % 2)) -eq 0 ]; then
    order=()
    for ((k = ${#targets[@]} - 1; k >= 0; k--)); do order+=("${targets[$k]}"); done
  fi
  for t in "${order[@]}"; do
    echo "rep $r: $t" >&2
    for m in ${MODES:-udp q20k q50k tcp}; do
      case "$m" in
        udp) run "$t" udp ;;
        q20k) run "$t" q20k -Q 20000 ;;
        q50k) run "$t" q50k -Q 50000 ;;
        tcp)
          if [ "$t" != direct ]; then
            timeout $((SECS + 30)) "$TCPLOAD" "${ADDR[$t]}:${PORT[$t]}" 8 20 "$SECS" | awk '{ print $2 }' >>"$WORK/res-$t-tcp"
          fi
          ;;
      esac
    done
  done
done

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "nan"; else print a[int((NR + 1) / 2)] }'; }
col() { [ -f "$WORK/res-$1" ] || { echo nan; return; }; awk -v c="$2" '{ print $c }' "$WORK/res-$1" | median; }
minmax() { [ -f "$WORK/res-$1" ] || { echo nan; return; }; awk -v c="$2" '{ print $c }' "$WORK/res-$1" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }'; }

echo
echo "Machine: $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(uname -r); $REPS runs of ${SECS}s, medians."
echo
echo "| target | UDP qps (median, min-max) | avg/max latency at 20k (us) | lost at 20k | CPU/query at 20k (us) | avg/max latency at 50k (us) | lost at 50k | CPU/query at 50k (us) | TCP qps | peak RSS (MB) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for t in "${targets[@]}"; do
  rss=$(rss_of "$t")
  tcp="-"
  [ "$t" != direct ] && tcp=$(col "$t-tcp" 1)
  printf '| %s | %s (%s) | %s / %s | %s | %s | %s / %s | %s | %s | %s | %s |\n' "$t" \
    "$(col "$t-udp" 1)" "$(minmax "$t-udp" 1)" \
    "$(col "$t-q20k" 2)" "$(col "$t-q20k" 3)" "$(col "$t-q20k" 4)" "$(col "$t-q20k" 5)" \
    "$(col "$t-q50k" 2)" "$(col "$t-q50k" 3)" "$(col "$t-q50k" 4)" "$(col "$t-q50k" 5)" \
    "$tcp" "$(awk -v r="$rss" 'BEGIN { if (r > 0) printf "%.1f", r / 1024; else print "-" }')"
done
echo
[ ${#targets[@]} -lt 4 ] && exit 0
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "nan" }'; }
echo "Ratios (lb / peer): UDP qps vs dnsdist $(ratio "$(col lb-udp 1)" "$(col dnsdist-udp 1)"), vs nginx $(ratio "$(col lb-udp 1)" "$(col nginx-udp 1)");" \
  "CPU/query at 20k vs dnsdist $(ratio "$(col lb-q20k 5)" "$(col dnsdist-q20k 5)"), at 50k $(ratio "$(col lb-q50k 5)" "$(col dnsdist-q50k 5)");" \
  "TCP qps vs dnsdist $(ratio "$(col lb-tcp 1)" "$(col dnsdist-tcp 1)");" \
  "peak RSS vs dnsdist $(ratio "$(rss_of lb)" "$(rss_of dnsdist)")."
