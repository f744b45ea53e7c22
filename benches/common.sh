# Shared helpers for the benchmark scripts (sourced, not run). Everything runs on loopback,
# every process started is recorded and killed on exit, every load run is bounded.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${BENCH_WORK:-$(mktemp -d /tmp/lb-bench.XXXXXX)}"
PIDS=()

cleanup() {
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  sleep 0.3
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true
  done
  [ -z "${BENCH_KEEP:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT

# Stops every daemon started so far (between two runs of a comparison).
stop_all() {
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  sleep 0.5
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true
  done
  PIDS=()
  sleep 0.5
}

# How daemons (NSD, lb, dnsdist, nginx) are started, the same way for every one of them:
#   SESSION=same  (default) in the benchmark's own session, each in a process group of its own
#                 (so it can be signalled alone), sharing the load's scheduler autogroup;
#   SESSION=own   each in a session of its own (setsid), so each gets its own autogroup (a CPU
#                 share of its own, as every service in its own cgroup under systemd).
# With kernel.sched_autogroup_enabled = 1 the two give very different figures (peers.md).
# Both prefixes exec the daemon, so "$!" is the daemon's own PID.
set_session() {
  SESSION="$1"
  case "$SESSION" in
    own) DAEMON=(setsid) ;;
    same) DAEMON=(python3 -c 'import os, sys; os.setpgid(0, 0); os.execvp(sys.argv[1], sys.argv[1:])') ;;
    *) echo "SESSION must be same or own" >&2; exit 2 ;;
  esac
}
set_session "${SESSION:-same}"
started_how() {
  echo "every daemon started $([ "$SESSION" = own ] && echo "in a session of its own (setsid)" || echo "in the benchmark's session, each in its own process group"); kernel.sched_autogroup_enabled=$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo '?')"
}

need() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Debian starts the packaged daemons on install; the benchmark runs its own instances.
  for svc in nsd named bind9 dnsdist nginx; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl stop "$svc" || true
    fi
  done
}

build_lb() {
  (cd "$ROOT" && cargo build --release -p lb -q)
  LB="$ROOT/target/release/lb"
}

# The benchmark zone of shared/reference/peers.md: SOA, NS, 250 A, 100 AAAA, 50 TXT, one
# ~1.5 KB TXT; and a wildcard (*.w) so that any number of distinct names exists (the cache
# memory measurement). $1 = file, $2 = serial.
write_zone() {
  local f="$1" serial="$2"
  {
    echo "\$TTL 300"
    echo "@ IN SOA ns1.example.test. hostmaster.example.test. $serial 3600 600 86400 300"
    echo "@ IN NS ns1.example.test."
    echo "ns1 IN A 127.0.0.1"
    for i in $(seq 0 249); do echo "a$i IN A 198.51.$((i / 250 + 100)).$((i % 250))"; done
    for i in $(seq 0 99); do echo "v6-$i IN AAAA 2001:db8::$i"; done
    for i in $(seq 0 49); do echo "t$i IN TXT \"text record $i for the benchmark\""; done
    echo "*.w IN A 192.0.2.77"
    printf 'big IN TXT'
    for i in $(seq 1 6); do printf ' "%s"' "$(head -c 250 /dev/zero | tr '\0' 'x')"; done
    echo
  } >"$f"
}

# The query mix: 70% A, 10% NXDOMAIN, 10% AAAA, 9% TXT, 1% the large TXT. $1 = file.
write_queries() {
  local f="$1"
  : >"$f"
  for i in $(seq 0 9999); do
    local r=$((i % 100))
    if [ $r -lt 70 ]; then echo "a$((i % 250)).example.test A"
    elif [ $r -lt 80 ]; then echo "nx$i.example.test A"
    elif [ $r -lt 90 ]; then echo "v6-$((i % 100)).example.test AAAA"
    elif [ $r -lt 99 ]; then echo "t$((i % 50)).example.test TXT"
    else echo "big.example.test TXT"
    fi
  done >>"$f"
}

# Starts NSD (one worker, no rate limiting) on $1 (IP) port 53 serving the zone with serial $2.
# Sets NSD_PID.
start_nsd() {
  local ip="$1" serial="$2" d="$WORK/nsd-$1"
  mkdir -p "$d"
  write_zone "$d/example.test.zone" "$serial"
  cat >"$d/nsd.conf" <<NSD
server:
  ip-address: $ip
  port: 53
  server-count: 1
  username: ""
  zonesdir: "$d"
  pidfile: "$d/nsd.pid"
  xfrdfile: "$d/xfrd.state"
  zonelistfile: "$d/zone.list"
  database: ""
  logfile: "$d/nsd.log"
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
  hide-version: yes
remote-control:
  control-enable: no
zone:
  name: example.test
  zonefile: example.test.zone
NSD
  "${DAEMON[@]}" nsd -d -c "$d/nsd.conf" >"$d/stdout" 2>&1 &
  NSD_PID=$!
  PIDS+=("$NSD_PID")
  wait_dns "$ip" 53
}

# Waits until $1:$2 answers SOA example.test.
wait_dns() {
  for _ in $(seq 1 100); do
    dig +short +norec +time=1 +tries=1 -p "$2" @"$1" example.test SOA >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "nothing answers on $1:$2" >&2
  return 1
}

# Starts lb on 127.0.0.1:$1 in front of the given backends, with $LB_BACKENDS_EXTRA (keys) in
# its [backends] section and $LB_EXTRA (TOML sections) appended. Sets LB_PID, LB_SOCK.
# LB_ACTIVATED=1 starts it as under lb.socket: benches/socket-activate.py creates the UDP and
# TCP sockets with lb.socket's options and execs lb with them (LISTEN_FDS), as systemd does; lb
# then serves on them, each UDP worker on a socket of its own in their SO_REUSEPORT group.
start_lb() {
  local port="$1" workers="$2"
  shift 2
  local list="" d="$WORK/lb-$port" be
  mkdir -p "$d"
  for be in "$@"; do list="$list\"$be\", "; done
  cat >"$d/lb.toml" <<TOML
[listen]
udp = ["127.0.0.1:$port"]
tcp = ["127.0.0.1:$port"]
workers = $workers
[backends]
servers = [${list%, }]
policy = "least-outstanding"
${LB_BACKENDS_EXTRA:-}
[health]
zones = ["example.test."]
interval_ms = 1000
[control]
socket = "$d/control.sock"
state_file = "$d/state.json"
[metrics]
listen = "127.0.0.1:0"
${LB_EXTRA:-}
TOML
  local launch=("$LB")
  if [ -n "${LB_ACTIVATED:-}" ]; then
    launch=(python3 "$ROOT/benches/socket-activate.py" "127.0.0.1:$port" "$LB")
  fi
  RUST_LOG=warn "${DAEMON[@]}" "${launch[@]}" run --config "$d/lb.toml" >"$d/log" 2>&1 &
  LB_PID=$!
  LB_SOCK="$d/control.sock"
  PIDS+=("$LB_PID")
  wait_dns 127.0.0.1 "$port"
}

# Runs dnsperf; $1 = port, rest = extra args. Prints its output.
run_dnsperf() {
  local port="$1"
  shift
  timeout 120 dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries.txt" -c 8 -T 1 -q 200 -t 2 "$@" 2>&1
}

# Extracts a number from dnsperf output: $1 = output, $2 = label ("Queries sent", ...).
dnsperf_field() {
  echo "$1" | awk -v k="$2:" 'index($0, k) { sub(/.*:[ \t]*/, ""); print $1; exit }'
}

# utime+stime in clock ticks of a process and its waited-for children.
cpu_ticks() {
  awk '{ print $14 + $15 + $16 + $17 }' "/proc/$1/stat"
}

# Context switches of all threads of a process: "voluntary involuntary".
ctx_switches() {
  cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt_switches/ { v += $2 } /^nonvoluntary_ctxt_switches/ { n += $2 } END { print v, n }'
}

# Peak RSS (VmHWM) in kB of a process.
peak_rss_kb() {
  awk '/VmHWM/ { print $2 }' "/proc/$1/status"
}

# dnsdist as in shared/reference/peers.md on 127.0.0.1:$1 (no packet cache unless $2 = cache).
# Sets DNSDIST_PID.
start_dnsdist() {
  local port="$1" cache="${2:-}" d="$WORK/dnsdist-$1"
  mkdir -p "$d"
  cat >"$d/dnsdist.conf" <<LUA
setLocal('127.0.0.1:$port', {reusePort=true})
addLocal('127.0.0.1:$port', {reusePort=true})
setMaxTCPClientThreads(2)
setSecurityPollSuffix('')
newServer({address='127.0.0.11:53', checkName='example.test.', checkType='SOA', checkInterval=1})
newServer({address='127.0.0.12:53', checkName='example.test.', checkType='SOA', checkInterval=1})
setServerPolicy(leastOutstanding)
LUA
  if [ "$cache" = cache ]; then
    echo "pc = newPacketCache(100000, {maxTTL=86400}) getPool(''):setCache(pc)" >>"$d/dnsdist.conf"
  fi
  # A process group of its own at least: dnsdist signals its process group on exit.
  "${DAEMON[@]}" dnsdist --supervised --disable-syslog -C "$d/dnsdist.conf" >"$d/log" 2>&1 &
  DNSDIST_PID=$!
  PIDS+=("$DNSDIST_PID")
  wait_dns 127.0.0.1 "$port"
}

# nginx stream as in shared/reference/peers.md on 127.0.0.1:$1. Sets NGINX_PID, NGINX_CONF.
start_nginx() {
  local port="$1" d="$WORK/nginx-$1"
  mkdir -p "$d/logs"
  NGINX_CONF="$d/nginx.conf"
  cat >"$NGINX_CONF" <<NGX
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 2;
daemon off;
pid $d/nginx.pid;
error_log $d/logs/error.log;
events { worker_connections 8192; }
stream {
  upstream dns_backends { server 127.0.0.11:53; server 127.0.0.12:53; }
  server { listen 127.0.0.1:$port udp reuseport; proxy_pass dns_backends; proxy_responses 1; proxy_timeout 3s; }
  server { listen 127.0.0.1:$port reuseport;     proxy_pass dns_backends; proxy_timeout 10s; }
}
NGX
  "${DAEMON[@]}" nginx -c "$NGINX_CONF" -p "$d" >"$d/stdout" 2>&1 &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
  wait_dns 127.0.0.1 "$port"
}

# Prints "sent completed lost" from dnsperf output in $1.
perf_counts() {
  echo "$(dnsperf_field "$1" "Queries sent") $(dnsperf_field "$1" "Queries completed") $(dnsperf_field "$1" "Queries lost")"
}
