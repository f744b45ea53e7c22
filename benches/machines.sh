#!/usr/bin/env bash
# Boot time and memory of the machines provider's machines (systemd-nspawn containers booted
# with systemd, each on its own network namespace): boots N machines one after the other, as
# `deployer up` does, and reports the time until each runs (systemd started) and until it
# accepts SSH, then the memory of each (proportional set size of its processes: the image's
# shared pages count once per machine) idle, then deletes them all and checks nothing is left.
#
# Usage: benches/machines.sh [N=6]          (root; builds the image once, then cached)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-6}"
[ "$(id -u)" -eq 0 ] || { echo "machines.sh: needs root" >&2; exit 1; }
source scripts/install-deps.sh >/dev/null
cargo build -q --release -p deployer
IMAGE=$(scripts/machine-image.sh)
WORK=$(mktemp -d /tmp/lb-bench-machines.XXXXXX)
CFG="$WORK/deployer.toml"
D=(target/release/deployer -c "$CFG")
mkdir -p "$WORK/ansible/zones"
printf '$TTL 60\n@ IN SOA ns. h. 1 60 60 60 60\n@ IN NS ns.\n' >"$WORK/ansible/zones/bench.test.zone"
cat >"$CFG" <<EOF
deployment = "mbench"
state_dir = "$WORK/state"
ansible_dir = "$WORK/ansible"
[provider]
kind = "machines"
[machines]
image = "$IMAGE"
public_bridge = "mbench-pub"
private_bridge = "mbench-vlan"
public_subnet = "10.239.0.0/24"
[[nameservers]]
name = "ns1"
[zones]
names = ["bench.test"]
[[lbs]]
name = "lb1"
fronts = ["ns1"]
EOF
cleanup() { "${D[@]}" down --yes >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
echo "== booting $N machines one after the other ($(nproc) CPUs; image $(basename "$IMAGE"))"
t0=$(date +%s.%N)
for i in $(seq 1 "$N"); do
  t=$(date +%s.%N)
  "${D[@]}" machines create "m$i" >/dev/null
  printf '  m%-3s running and accepting SSH after %.2fs\n' "$i" "$(echo "$(date +%s.%N) - $t" | bc)"
done
printf '  all %s in %.1fs\n' "$N" "$(echo "$(date +%s.%N) - $t0" | bc)"
sleep 5
echo "== memory after 5 s idle"
"${D[@]}" machines list | sed 's/^/  /'
"${D[@]}" --json machines list | python3 -c '
import json, sys
m = json.load(sys.stdin)["machines"]
mem = [x["memory_bytes"] / 1048576 for x in m]
print(f"  mean {sum(mem) / len(mem):.1f} MiB per machine, total {sum(mem):.1f} MiB")'
t=$(date +%s.%N)
"${D[@]}" down --yes >/dev/null
printf '== deleted all in %.1fs\n' "$(echo "$(date +%s.%N) - $t" | bc)"
left=$(ip netns list | grep -c '^lbm-mbench-' || true)
echo "  left behind: $left network namespaces, $(ls /sys/class/net | grep -c '^mbench-' || true) bridges"
