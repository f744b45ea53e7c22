#!/usr/bin/env bash
# Benchmark for the upgrade issue: replace the running proxy process under a fixed dnsperf load
# and count lost queries, for lb and for the peers.
#
#   lb upgrade        `lb ctl upgrade --binary COPY` (sockets handed over, old one drains)
#   lb plain restart  SIGTERM, then start again (no socket activation: the gap loses queries)
#   nginx reload      `nginx -s reload` (new workers, old ones finish)
#   dnsdist restart   SIGTERM, then start again (what `systemctl restart dnsdist` does)
#
# Two NSD backends (127.0.0.11/12) as in shared/reference/peers.md.
# Usage: benches/upgrade.sh [QPS] [SECONDS]     (defaults 20000 and 20; run as root)
source "$(dirname "$0")/common.sh"
QPS="${1:-20000}"
SECS="${2:-20}"
need nsd dnsperf dnsutils dnsdist nginx libnginx-mod-stream
build_lb
write_queries "$WORK/queries.txt"
start_nsd 127.0.0.11 1
start_nsd 127.0.0.12 1
cp "$LB" "$WORK/lb-next"

# $1 = label, $2 = port, $3 = shell command run halfway through the load.
measure() {
  local label="$1" port="$2" action="$3"
  run_dnsperf "$port" -Q "$QPS" -l "$SECS" >"$WORK/perf.out" &
  local perf=$!
  sleep "$((SECS / 2))"
  eval "$action"
  wait "$perf" || true
  read -r sent done lost <<<"$(perf_counts "$(cat "$WORK/perf.out")")"
  echo "| $label | $QPS | $SECS | $sent | $done | $lost |"
}

echo "| action | qps | seconds | sent | completed | lost |"
echo "| --- | --- | --- | --- | --- | --- |"

start_lb 5300 2 127.0.0.11:53 127.0.0.12:53
measure "lb: lb ctl upgrade" 5300 '"$LB" ctl --socket "$LB_SOCK" upgrade --binary "$WORK/lb-next" >/dev/null'
# The new process is not in PIDS: stop it through its control socket's pid.
newpid=$("$LB" ctl --json --socket "$LB_SOCK" status | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
kill "$newpid" 2>/dev/null || true
sleep 1

start_lb 5303 2 127.0.0.11:53 127.0.0.12:53
measure "lb: plain restart (SIGTERM + start, no lb.socket)" 5303 \
  'kill "$LB_PID"; wait "$LB_PID" 2>/dev/null || true; RUST_LOG=warn "$LB" run --config "$WORK/lb-5303/lb.toml" >>"$WORK/lb-5303/log" 2>&1 & PIDS+=("$!")'

start_nginx 5302
measure "nginx: nginx -s reload" 5302 'nginx -c "$NGINX_CONF" -p "$WORK/nginx-5302" -s reload'

start_dnsdist 5301
measure "dnsdist: restart (SIGTERM + start)" 5301 \
  'kill "$DNSDIST_PID"; wait "$DNSDIST_PID" 2>/dev/null || true; setsid dnsdist --supervised --disable-syslog -C "$WORK/dnsdist-5301/dnsdist.conf" >>"$WORK/dnsdist-5301/log" 2>&1 & PIDS+=("$!")'
