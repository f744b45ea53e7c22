#!/usr/bin/env bash
# Peer benchmark: lb against dnsdist and nginx stream (and NSD queried directly), with and
# without packet caches, same machine, same backends, same load, in alternating order; prints
# markdown tables of medians, one per way of starting the daemons.
#
# Setup as in shared/reference/peers.md: two NSD backends (one worker, RRL off) on
# 127.0.0.11/12:53 serving the benchmark zone; dnsdist 2 listeners, leastOutstanding, without
# and with its packet cache (100,000 entries); nginx stream 2 workers reuseport; lb 2 UDP
# workers (LB_WORKERS), least-outstanding, without and with its packet cache; and lb-activated,
# the packaged path: the same lb started as under lb.socket (benches/socket-activate.py makes
# the sockets with lb.socket's options and execs lb with LISTEN_FDS, as systemd does), whose
# workers each read a socket of their own in the SO_REUSEPORT group of the passed one. Load:
# dnsperf -c 8 -T 1 -q 200 -t 2, query mix of peers.md.
#
# Fairness: every daemon (the NSD backends, lb, dnsdist, nginx) is started the same way. The
# whole comparison runs once per SESSIONS entry:
#   same  every daemon in the benchmark's session (as dnsperf), each in its own process group;
#   own   every daemon in a session of its own (setsid): each its own scheduler autogroup, as
#         every service in its own cgroup under systemd.
# The table says how. (dnsdist in its own session and lb not made dnsdist look half as fast as
# it is: peers.md.)
#
# Measures per target: unthrottled UDP qps (-l SECS), average and max latency and lost queries
# at fixed 20k and 50k qps, CPU time of the proxy per answered query at those rates
# (utime+stime of every process of the proxy / queries completed), TCP qps over 8 persistent
# connections with 20 queries pipelined on each (tests/examples/tcpload.rs), and peak RSS; for
# the caching targets, peak RSS after 100,000 distinct names (n0..n99999.w.example.test, a
# wildcard) were asked twice and cached.
#
# Usage: benches/compare.sh [REPS] [SECS]     (defaults 3 and 10; run as root; ~25 min per session)
#        SESSIONS="same" TARGETS="lb dnsdist" MODES="udp q50k" benches/compare.sh 3 10
source "$(dirname "$0")/common.sh"
REPS="${1:-3}"
SECS="${2:-10}"
LB_WORKERS="${LB_WORKERS:-2}"
need nsd dnsperf dnsutils dnsdist nginx libnginx-mod-stream
build_lb
(cd "$ROOT" && cargo build --release -q -p integration-tests --example tcpload)
TCPLOAD="$ROOT/target/release/examples/tcpload"
write_queries "$WORK/queries.txt"
for i in $(seq 0 99999); do echo "n$i.w.example.test A"; done >"$WORK/names100k.txt"
HZ=$(getconf CLK_TCK)
# lb's cache sized for the 100,000 names, slots of 192 bytes: the largest answer it stores.
# Every answer of this zone fits but the 1.5 KB TXT, which is truncated over UDP (TC=1) and
# never cached anyway.
LB_CACHE="[cache]
entries = 131072
max_answer_size_bytes = 192"

declare -A PORT=([direct]=53 [lb]=5300 [dnsdist]=5301 [nginx]=5302 [lb-cache]=5303 [dnsdist-cache]=5304 [lb-activated]=5305)
declare -A ADDR=([direct]=127.0.0.11 [lb]=127.0.0.1 [dnsdist]=127.0.0.1 [nginx]=127.0.0.1 [lb-cache]=127.0.0.1 [dnsdist-cache]=127.0.0.1 [lb-activated]=127.0.0.1)
declare -A TPID

# PIDs of a target's processes (nginx has workers).
pids_of() {
  case "$1" in
    direct) echo "" ;;
    nginx) echo "${TPID[nginx]} $(pgrep -P "${TPID[nginx]}" | tr '\n' ' ')" ;;
    *) echo "${TPID[$1]}" ;;
  esac
}
ticks_of() { local t=0; for p in $(pids_of "$1"); do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$t"; }
rss_of() { local r=0; for p in $(pids_of "$1"); do r=$((r + $(peak_rss_kb "$p"))); done; echo "$r"; }

# run SESSION TARGET MODE ARGS... -> appends "qps avg_us max_us lost cpu_us_per_query"
run() {
  local s="$1" t="$2" mode="$3"
  shift 3
  local before after out
  before=$(ticks_of "$t")
  out=$(timeout $((SECS + 30)) dnsperf -s "${ADDR[$t]}" -p "${PORT[$t]}" -d "$WORK/queries.txt" -c 8 -T 1 -q 200 -t 2 -l "$SECS" "$@" 2>&1)
  after=$(ticks_of "$t")
  local qps avg max lost done cpu
  qps=$(echo "$out" | awk '/Queries per second:/ { printf "%.0f", $4 }')
  avg=$(echo "$out" | awk '/Average Latency/ { printf "%.0f", $4 * 1e6 }')
  max=$(echo "$out" | awk '/Average Latency/ { gsub(/[(),]/, ""); printf "%.0f", $8 * 1e6 }')
  lost=$(dnsperf_field "$out" "Queries lost")
  done=$(dnsperf_field "$out" "Queries completed")
  cpu=$(awk -v a="$before" -v b="$after" -v n="$done" -v hz="$HZ" 'BEGIN { if (n > 0) printf "%.2f", (b - a) / hz / n * 1e6; else print "nan" }')
  echo "$qps $avg $max $lost $cpu" >>"$WORK/res-$s-$t-$mode"
}

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "nan"; else print a[int((NR + 1) / 2)] }'; }
col() { [ -f "$WORK/res-$1" ] || { echo nan; return; }; awk -v c="$2" '{ print $c }' "$WORK/res-$1" | median; }
minmax() { [ -f "$WORK/res-$1" ] || { echo nan; return; }; awk -v c="$2" '{ print $c }' "$WORK/res-$1" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a != "nan") printf "%.2f", a / b; else print "nan" }'; }

read -r -a targets <<<"${TARGETS:-lb lb-activated dnsdist nginx direct lb-cache dnsdist-cache}"
has() { [[ " ${targets[*]} " == *" $1 "* ]]; }

for s in ${SESSIONS:-same own}; do
  set_session "$s"
  start_nsd 127.0.0.11 1
  start_nsd 127.0.0.12 1
  if has lb; then start_lb 5300 "$LB_WORKERS" 127.0.0.11:53 127.0.0.12:53; TPID[lb]=$LB_PID; fi
  if has lb-cache; then LB_EXTRA="$LB_CACHE" start_lb 5303 "$LB_WORKERS" 127.0.0.11:53 127.0.0.12:53; TPID[lb-cache]=$LB_PID; fi
  if has lb-activated; then LB_ACTIVATED=1 start_lb 5305 "$LB_WORKERS" 127.0.0.11:53 127.0.0.12:53; TPID[lb-activated]=$LB_PID; fi
  if has dnsdist; then start_dnsdist 5301; TPID[dnsdist]=$DNSDIST_PID; fi
  if has dnsdist-cache; then start_dnsdist 5304 cache; TPID[dnsdist-cache]=$DNSDIST_PID; fi
  if has nginx; then start_nginx 5302; TPID[nginx]=$NGINX_PID; fi
  sleep 2 # first health checks
  echo "session $s: $(started_how)" >&2
  for r in $(seq 1 "$REPS"); do
    # Alternate the order between repetitions.
    order=("${targets[@]}")
    if [ $((r % 2)) -eq 0 ]; then
      order=()
      for ((k = ${#targets[@]} - 1; k >= 0; k--)); do order+=("${targets[$k]}"); done
    fi
    for t in "${order[@]}"; do
      echo "session $s, rep $r: $t" >&2
      for m in ${MODES:-udp q20k q50k tcp}; do
        case "$m" in
          udp) run "$s" "$t" udp ;;
          q20k) run "$s" "$t" q20k -Q 20000 ;;
          q50k) run "$s" "$t" q50k -Q 50000 ;;
          tcp)
            if [ "$t" != direct ]; then
              timeout $((SECS + 30)) "$TCPLOAD" "${ADDR[$t]}:${PORT[$t]}" 8 20 "$SECS" | awk '{ print $2 }' >>"$WORK/res-$s-$t-tcp"
            fi
            ;;
        esac
      done
    done
  done
  # Memory with 100,000 distinct names cached (asked twice: the second pass is all hits).
  for t in lb-cache dnsdist-cache; do
    has "$t" || continue
    for pass in 1 2; do
      timeout 120 dnsperf -s 127.0.0.1 -p "${PORT[$t]}" -d "$WORK/names100k.txt" -n 1 -c 8 -T 1 -q 200 -t 2 -Q 40000 >/dev/null 2>&1 || true
    done
    echo "$(rss_of "$t")" >"$WORK/rss100k-$s-$t"
  done
  for t in "${targets[@]}"; do
    [ "$t" = direct ] && continue
    rss_of "$t" >"$WORK/rss-$s-$t"
  done

  echo
  echo "### Daemons started: $(started_how)"
  echo
  echo "Machine: $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(uname -r); $REPS runs of ${SECS}s each, alternating order, medians."
  echo
  echo "| target | UDP qps (median, min-max) | avg/max latency at 20k (us) | lost at 20k | CPU/query at 20k (us) | avg/max latency at 50k (us) | lost at 50k | CPU/query at 50k (us) | TCP qps | peak RSS (MB) |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for t in "${targets[@]}"; do
    rss="-"
    tcp="-"
    if [ "$t" != direct ]; then
      tcp=$(col "$s-$t-tcp" 1)
      rss=$(awk -v r="$(cat "$WORK/rss-$s-$t")" 'BEGIN { printf "%.1f", r / 1024 }')
      [ -f "$WORK/rss100k-$s-$t" ] && rss="$rss (after 100k names: $(awk -v r="$(cat "$WORK/rss100k-$s-$t")" 'BEGIN { printf "%.1f", r / 1024 }'))"
    fi
    printf '| %s | %s (%s) | %s / %s | %s | %s | %s / %s | %s | %s | %s | %s |\n' "$t" \
      "$(col "$s-$t-udp" 1)" "$(minmax "$s-$t-udp" 1)" \
      "$(col "$s-$t-q20k" 2)" "$(col "$s-$t-q20k" 3)" "$(col "$s-$t-q20k" 4)" "$(col "$s-$t-q20k" 5)" \
      "$(col "$s-$t-q50k" 2)" "$(col "$s-$t-q50k" 3)" "$(col "$s-$t-q50k" 4)" "$(col "$s-$t-q50k" 5)" \
      "$tcp" "$rss"
  done
  echo
  if has lb && has dnsdist && has nginx; then
    echo "Without caches, lb / peer: UDP qps vs dnsdist $(ratio "$(col "$s-lb-udp" 1)" "$(col "$s-dnsdist-udp" 1)"), vs nginx $(ratio "$(col "$s-lb-udp" 1)" "$(col "$s-nginx-udp" 1)");" \
      "CPU/query vs dnsdist at 20k $(ratio "$(col "$s-lb-q20k" 5)" "$(col "$s-dnsdist-q20k" 5)"), at 50k $(ratio "$(col "$s-lb-q50k" 5)" "$(col "$s-dnsdist-q50k" 5)");" \
      "TCP qps vs dnsdist $(ratio "$(col "$s-lb-tcp" 1)" "$(col "$s-dnsdist-tcp" 1)"); peak RSS vs dnsdist $(ratio "$(cat "$WORK/rss-$s-lb")" "$(cat "$WORK/rss-$s-dnsdist")")."
  fi
  if has lb && has lb-activated; then
    echo "Socket-activated lb (as under lb.socket) / directly bound lb: UDP qps $(ratio "$(col "$s-lb-activated-udp" 1)" "$(col "$s-lb-udp" 1)");" \
      "CPU/query at 20k $(ratio "$(col "$s-lb-activated-q20k" 5)" "$(col "$s-lb-q20k" 5)"), at 50k $(ratio "$(col "$s-lb-activated-q50k" 5)" "$(col "$s-lb-q50k" 5)");" \
      "TCP qps $(ratio "$(col "$s-lb-activated-tcp" 1)" "$(col "$s-lb-tcp" 1)")."
  fi
  if has lb-cache && has dnsdist-cache; then
    echo "With caches, lb / peer: UDP qps vs dnsdist-cache $(ratio "$(col "$s-lb-cache-udp" 1)" "$(col "$s-dnsdist-cache-udp" 1)"), vs NSD direct $(ratio "$(col "$s-lb-cache-udp" 1)" "$(col "$s-direct-udp" 1)");" \
      "CPU/query vs dnsdist-cache at 20k $(ratio "$(col "$s-lb-cache-q20k" 5)" "$(col "$s-dnsdist-cache-q20k" 5)"), at 50k $(ratio "$(col "$s-lb-cache-q50k" 5)" "$(col "$s-dnsdist-cache-q50k" 5)");" \
      "peak RSS after 100k names vs dnsdist-cache $(ratio "$(cat "$WORK/rss100k-$s-lb-cache")" "$(cat "$WORK/rss100k-$s-dnsdist-cache")")."
  fi
  echo
  stop_all
done
