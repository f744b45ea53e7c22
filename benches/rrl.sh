#!/usr/bin/env bash
# Response rate limiting against a spoofed-source flood, lb against BIND's own RRL (the anchor).
#
# Clients on 50 addresses of 127.0.1.0/24 (one /24, as a spoofed flood at one victim network
# looks) ask for a TXT whose answer is about 850 bytes (EDNS 1232) at RATE qps for SECS
# seconds, while a client on 127.0.2.1 asks the same name 10 times a second
# (tests/examples/rrlflood.rs). The same traffic goes to:
#   lb with [rrl] responses_per_second = 20, slip = 2, window_secs = 5, in front of BIND without RRL;
#   BIND directly with rate-limit { responses-per-second 20; slip 2; window 5; };
#   lb without [rrl] (what the first wave did: every query answered in full).
# Prints, per target: queries, full answers, slipped (TC=1) answers, bytes sent to the flooded
# /24 over bytes received from it, and the answers the client under the limit got.
#
# Usage: benches/rrl.sh [RATE] [SECS]     (defaults 5000 and 10; run as root)
source "$(dirname "$0")/common.sh"
RATE="${1:-5000}"
SECS="${2:-10}"
need bind9 bind9-utils dnsutils
build_lb
(cd "$ROOT" && cargo build --release -q -p integration-tests --example rrlflood)
FLOOD="$ROOT/target/release/examples/rrlflood"

# BIND on 127.0.0.1:$1 (named listens only on addresses configured on an interface, and lo
# has just 127.0.0.1) serving example.test with a ~850-byte TXT; $2 = "rrl" for BIND's RRL.
start_named() {
  local port="$1" rrl="${2:-}" d="$WORK/named-$1"
  mkdir -p "$d"
  {
    echo "\$TTL 300"
    echo "@ IN SOA ns1.example.test. hostmaster.example.test. 1 3600 600 86400 300"
    echo "@ IN NS ns1.example.test."
    echo "ns1 IN A 127.0.0.1"
    printf 'medium IN TXT'
    for i in 1 2 3 4; do printf ' "%s"' "$(head -c 200 /dev/zero | tr '\0' "$i")"; done
    echo
  } >"$d/example.test.zone"
  local limit=""
  [ "$rrl" = rrl ] && limit="rate-limit { responses-per-second 20; slip 2; window 5; };"
  cat >"$d/named.conf" <<CONF
options {
  directory "$d";
  pid-file "$d/named.pid";
  session-keyfile "$d/session.key";
  listen-on port $port { 127.0.0.1; };
  listen-on-v6 { none; };
  recursion no;
  allow-transfer { none; };
  notify no;
  $limit
};
controls { };
zone "example.test" { type primary; file "$d/example.test.zone"; };
CONF
  "${DAEMON[@]}" /usr/sbin/named -g -4 -n 1 -c "$d/named.conf" >"$d/log" 2>&1 &
  PIDS+=("$!")
  wait_dns 127.0.0.1 "$port"
}

start_named 5320
start_named 5321 rrl
LB_EXTRA=$'[rrl]\nresponses_per_second = 20\nslip = 2\nwindow_secs = 5' start_lb 5300 2 127.0.0.1:5320
start_lb 5301 2 127.0.0.1:5320
sleep 1

echo "$(started_how); flood of $RATE qps for ${SECS}s from 50 addresses of 127.0.1.0/24; a client on 127.0.2.1 at 10 qps"
echo
echo "| target | queries | full answers | slipped (TC=1) | bytes out/in | client under the limit |"
echo "| --- | --- | --- | --- | --- | --- |"
for target in "lb with [rrl]=127.0.0.1:5300" "BIND with its RRL=127.0.0.1:5321" "lb without [rrl]=127.0.0.1:5301"; do
  name="${target%%=*}"
  addr="${target#*=}"
  # Let any balance of the previous run expire.
  sleep 6
  out=$("$FLOOD" "$addr" "$RATE" "$SECS")
  set -- $out
  sent=$2 bytes_sent=$4 full=$6 slipped=$8 bytes_received=${10} good_sent=${12} good_full=${14}
  printf '| %s | %s | %s | %s | %s | %s of %s |\n' "$name" "$sent" "$full" "$slipped" \
    "$(awk -v a="$bytes_received" -v b="$bytes_sent" 'BEGIN { printf "%.2f", a / b }')" "$good_full" "$good_sent"
done
