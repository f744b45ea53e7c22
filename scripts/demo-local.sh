#!/usr/bin/env bash
# The quick demo (`scripts/demo.sh --local`), end to end on loopback with the local provider:
#   1. installs what it needs (apt: bind9, dnsutils, dnsperf; pip: ansible-core),
#   2. builds lb and deployer,
#   3. `deployer up`: two BIND nameservers and two lb load balancers (one in front of each),
#   4. starts a steady dnsperf load through both load balancers,
#   5. bumps the zone's SOA serial and runs `deployer roll` (new nameservers, provisioned by
#      Ansible, checked, lbs flipped with a verified swap, old ones deleted, renamed),
#   6. prints the steps and times, the serial before and after, and
#      `queries sent: N, lost: M`; exits non-zero if any query was lost.
# Everything runs on 127.0.0.1 and is torn down at the end (DEMO_KEEP=1 keeps it running).
#
# Usage: scripts/demo.sh --local [QPS_PER_LB] [SECONDS]   (defaults 2000 and 25)
#        (or scripts/demo-local.sh [QPS_PER_LB] [SECONDS])
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
QPS="${1:-2000}"
SECS="${2:-25}"

source scripts/install-deps.sh
cargo build --release -q -p lb -p deployer

WORK="$(mktemp -d /tmp/lb-demo.XXXXXX)"
cp -r ansible "$WORK/ansible"
ZONE="$WORK/ansible/zones/example.test.zone"
CFG="$WORK/deployer.toml"
sed -e "s#^state_dir = .*#state_dir = \"$WORK/state\"#" \
    -e "s#^registry_dir = .*#registry_dir = \"$WORK/world\"#" \
    -e "s#^ansible_dir = .*#ansible_dir = \"$WORK/ansible\"#" \
    -e "s#^lb_binary = .*#lb_binary = \"$ROOT/target/release/lb\"#" \
    -e "s#^deployment = .*#deployment = \"demo\"#" \
    deployer/examples/local.toml >"$CFG"
DEPLOYER="$ROOT/target/release/deployer"
PERF_PIDS=()
cleanup() {
  for p in "${PERF_PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  if [ -z "${DEMO_KEEP:-}" ]; then
    "$DEPLOYER" -c "$CFG" down --yes >/dev/null 2>&1 || true
    rm -rf "$WORK"
  else
    echo "kept: config $CFG (tear down with: $DEPLOYER -c $CFG down --yes)"
  fi
}
trap cleanup EXIT

echo "== deployer up"
"$DEPLOYER" -c "$CFG" up 2>"$WORK/up.log" || { cat "$WORK/up.log"; exit 1; }

lb_addrs=$("$DEPLOYER" -c "$CFG" --json status | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(" ".join(l["address"] for l in s["lbs"]))')
first_lb=${lb_addrs%% *}
serial_of() { dig +short +norec -p "${1##*:}" @"${1%:*}" example.test SOA | awk '{ print $3 }'; }
serial_before=$(serial_of "$first_lb")

printf 'example.test SOA\nwww.example.test A\nwww.example.test AAAA\nexample.test MX\nmail.example.test A\nnope.example.test A\n' >"$WORK/queries.txt"
echo "== steady load: $QPS qps through each of: $lb_addrs for ${SECS}s"
i=0
for a in $lb_addrs; do
  dnsperf -s "${a%:*}" -p "${a##*:}" -d "$WORK/queries.txt" -Q "$QPS" -l "$SECS" -c 4 -t 2 >"$WORK/perf-$i.out" 2>&1 &
  PERF_PIDS+=("$!")
  i=$((i + 1))
done
sleep 3

new_serial=$(( $(awk '/; serial/ { print $1 }' "$ZONE") + 1 ))
sed -i "s/^\( *\)[0-9]\+ ; serial/\1$new_serial ; serial/" "$ZONE"
echo "== deployer roll (zone serial bumped to $new_serial)"
t0=$(date +%s.%N)
"$DEPLOYER" -c "$CFG" roll 2>"$WORK/roll.log" || { cat "$WORK/roll.log"; echo "roll failed"; }
t1=$(date +%s.%N)

echo "== waiting for the load to finish"
for p in "${PERF_PIDS[@]}"; do wait "$p" || true; done
PERF_PIDS=()
serial_after=$(serial_of "$first_lb")

sent=0; lost=0
for f in "$WORK"/perf-*.out; do
  s=$(awk '/Queries sent:/ { print $3 }' "$f"); l=$(awk '/Queries lost:/ { print $3 }' "$f")
  sent=$((sent + ${s:-0})); lost=$((lost + ${l:-0}))
done
echo
echo "== summary"
"$DEPLOYER" -c "$CFG" status | sed 's/^/  /'
printf '  roll took %.1fs\n' "$(echo "$t1 - $t0" | bc)"
echo "  serial before: $serial_before, after: $serial_after"
echo "queries sent: $sent, lost: $lost"
[ "$lost" -eq 0 ] && [ "$serial_after" = "$new_serial" ]
