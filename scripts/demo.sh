#!/usr/bin/env bash
# The main job: a production rehearsal on this one host. Everything runs the way production
# runs, on Debian 12 machines (systemd-nspawn containers booted with systemd, each with its own
# network stack, on a "public" bridge and a private one standing for the Linode VLAN), made by
# the deployer's `machines` provider:
#   1. installs what it needs (apt, pip), builds lb, the deployer and the load generator, and
#      two lb Debian packages (OLD and NEW versions); builds the machine image once (cached);
#   2. `deployer up`: two nameservers (BIND) and two lbs, the lb from its .deb under systemd
#      (lb.socket + lb.service), provisioned by the Ansible roles over SSH, both firewalls on;
#   3. a parent zone server (BIND) delegating the zone to the lbs (NS + addresses) and a
#      recursive resolver (Unbound) on two more machines; a steady load (phaseload) asks the
#      resolver, and what the resolver returns is the measure;
#   4. phases under that load: steady; a zone change + `deployer roll`; `deployer roll-lb`
#      whose delegation hook changes the delegation at the parent with nsupdate (TSIG); an lb
#      package upgrade (`apt install ./lb_NEW.deb` through the role: `deployer provision-lbs`);
#      then a settle period (60 s) in which systemd's watchdog would have struck;
#   5. prints per phase the queries sent, answered, SERVFAIL and timeouts at the resolver,
#      each lb's MainPID/NRestarts before and after the upgrade, machine memory, the time of
#      each phase, then `rehearsal: lost N, servfail N, restarts N, leftovers N`; tears
#      everything down and checks that nothing is left (containers, bridges, mounts, veths).
# Exits non-zero on any lost query, SERVFAIL, restart or leftover. Needs root.
#
# Usage: scripts/demo.sh [--qps N] [--steady SECS] [--settle SECS] [--keep]
#        scripts/demo.sh --local [QPS_PER_LB] [SECONDS]     (the quick loopback demo)
# Environment: REHEARSAL_NAME (deployment, bridge and machine names; default "rehearsal"),
# REHEARSAL_NET (second octet of its 10.N.x.0 subnets; default 231), CARGO_PROFILE
# (default "rehearsal": release without LTO, to build in minutes), REHEARSAL_NO_BUILD=1 (use
# the binaries already built for CARGO_PROFILE).
set -euo pipefail
if [ "${1:-}" = "--local" ]; then
  shift
  exec "$(dirname "$0")/demo-local.sh" "$@"
fi
cd "$(dirname "$0")/.."
ROOT="$PWD"
QPS=200
STEADY=20
SETTLE=60
KEEP=
while [ $# -gt 0 ]; do
  case "$1" in
    --qps) QPS="$2"; shift 2 ;;
    --steady) STEADY="$2"; shift 2 ;;
    --settle) SETTLE="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "demo.sh: the rehearsal needs root (containers, bridges); scripts/demo.sh --local runs without" >&2; exit 1; }
NAME="${REHEARSAL_NAME:-rehearsal}"
NET="${REHEARSAL_NET:-231}"
PROFILE="${CARGO_PROFILE:-rehearsal}"
T_START=$(date +%s.%N)
now() { date +%s.%N; }
since() { printf '%.1f' "$(echo "$(now) - $1" | bc)"; }

source scripts/install-deps.sh
echo "== building lb, deployer and the load generator (profile $PROFILE)"
t=$(now)
OUT="$ROOT/target/$PROFILE"
[ "$PROFILE" = dev ] && OUT="$ROOT/target/debug"
# The integration test runs this script from inside `cargo test`, with everything built.
if [ -z "${REHEARSAL_NO_BUILD:-}" ]; then
  cargo build -q --profile "$PROFILE" -p lb -p deployer -p integration-tests --bins --example phaseload
fi
for b in lb deployer examples/phaseload; do
  [ -x "$OUT/$b" ] || { echo "demo.sh: $OUT/$b is not built" >&2; exit 1; }
done
T_BUILD=$(since "$t")

WORK="$(mktemp -d "/tmp/lb-$NAME.XXXXXX")"
chmod 700 "$WORK"
DEPLOYER="$OUT/deployer"
CFG="$WORK/deployer.toml"
LOAD_PID=
cleanup() {
  local rc=$?
  [ -n "$LOAD_PID" ] && kill "$LOAD_PID" 2>/dev/null || true
  if [ -n "$KEEP" ]; then
    echo "kept: config $CFG (tear down with: $DEPLOYER -c $CFG down --yes)"
    exit $rc
  fi
  "$DEPLOYER" -c "$CFG" down --yes >"$WORK/down.log" 2>&1 || cat "$WORK/down.log" >&2
  local left
  left=$(leftovers)
  if [ -n "$left" ]; then
    echo "LEFTOVERS after teardown: $left" >&2
    rc=1
  fi
  rm -rf "$WORK"
  exit $rc
}
# What this rehearsal could leave behind on the host: its containers, network namespaces,
# bridges, veths, overlay mounts.
leftovers() {
  {
    ip netns list 2>/dev/null | awk '{ print $1 }' | grep "^lbm-$NAME-" || true
    for b in "$NAME-pub" "$NAME-vlan"; do [ -e "/sys/class/net/$b" ] && echo "bridge $b"; done
    grep " $WORK/" /proc/mounts | awk '{ print "mount " $2 }' || true
    pgrep -af "systemd-nspawn.*lbm-$NAME-" | awk '{ print "nspawn pid " $1 }' || true
  } | tr '\n' ' '
}
trap cleanup EXIT

echo "== packaging lb: two versions, OLD installed by up, NEW by the upgrade"
VERSION=$(awk -F'"' '/^version/ { print $2; exit }' Cargo.toml)
scripts/package.sh --profile "$PROFILE" --no-build --fast --deb-version "$VERSION-1~rehearsal1" \
  --output "$WORK/debs-old" >"$WORK/pkg-old.txt" 2>"$WORK/pkg-old.log" || { cat "$WORK/pkg-old.log"; exit 1; }
scripts/package.sh --profile "$PROFILE" --no-build --fast --deb-version "$VERSION-1~rehearsal2" \
  --output "$WORK/debs-new" >"$WORK/pkg-new.txt" 2>"$WORK/pkg-new.log" || { cat "$WORK/pkg-new.log"; exit 1; }
LB_OLD=$(grep '/lb_' "$WORK/pkg-old.txt")
LB_NEW=$(grep '/lb_' "$WORK/pkg-new.txt")

echo "== machine image (built once, then cached)"
t=$(now)
IMAGE=$(scripts/machine-image.sh)
T_IMAGE=$(since "$t")

# The zone: its nameservers are the lbs, under names the parent zone holds (lbN.ns.test), so
# a change of the lbs' addresses is one update at the parent. A wildcard gives the load an
# endless supply of names no cache holds.
cp -r ansible "$WORK/ansible"
ZONE="$WORK/ansible/zones/example.test.zone"
cat >"$ZONE" <<'EOF'
; example.test for the rehearsal. Bump the serial on every change.
$TTL 10
@       IN SOA  lb1.ns.test. hostmaster.example.test. (
                2026120501 ; serial
                3600       ; refresh
                600        ; retry
                86400      ; expire
                10 )       ; negative TTL
        IN NS   lb1.ns.test.
        IN NS   lb2.ns.test.
        IN MX   10 mail.example.test.
www     IN A    192.0.2.1
www     IN AAAA 2001:db8::1
mail    IN A    192.0.2.25
*.w     IN A    192.0.2.80
@       IN TXT  "v=spf1 mx -all"
EOF
{
  printf 'www.example.test A\nwww.example.test AAAA\nexample.test MX\nexample.test SOA\nmail.example.test A\nnope.example.test A NXDOMAIN\n'
  for i in $(seq 1 3000); do echo "n$i.w.example.test A"; done
} >"$WORK/queries.txt"

tsig-keygen -a hmac-sha256 rehearsal-update >"$WORK/update.key"
SECRET=$(awk -F'"' '/secret/ { print $2 }' "$WORK/update.key")
cat >"$WORK/delegation-hook.sh" <<EOF
#!/bin/sh
# roll-lb's delegation hook: point lbN.ns.test at the new lbs at the parent (nsupdate, TSIG).
export NSUPDATE_SERVER="\$(cat $WORK/parent-address)" NSUPDATE_KEY_FILE="$WORK/update.key" NSUPDATE_SUFFIX=ns.test NSUPDATE_TTL=10
exec python3 "$ROOT/scripts/delegation-hook-nsupdate.py" "\$@"
EOF
chmod +x "$WORK/delegation-hook.sh"

cat >"$CFG" <<EOF
deployment = "$NAME"
state_dir = "$WORK/state"
ansible_dir = "$WORK/ansible"
lb_binary = "$OUT/lb"

[provider]
kind = "machines"
registry_dir = "$WORK/world"

[machines]
image = "$IMAGE"
public_bridge = "$NAME-pub"
private_bridge = "$NAME-vlan"
public_subnet = "10.$NET.0.0/24"

[network]
vlan = "$NAME-backplane"
subnet = "10.$NET.1.0/24"

[[nameservers]]
name = "ns1"

[[nameservers]]
name = "ns2"

[zones]
names = ["example.test"]

[[lbs]]
name = "lb1"
fronts = ["ns1"]

[[lbs]]
name = "lb2"
fronts = ["ns2"]

[roll_lb]
delegation_hook = "$WORK/delegation-hook.sh"
# parent_servers is added once the parent zone's server exists (below).
drain_threshold_qps = 1.0
poll_secs = 1.0
max_drain_secs = 300

# roll flips lb1 first and soaks it against lb2 under the phase's load (through the resolver,
# whose cache keeps part of it from the lbs: hence the low min_answers).
[canary]
soak_secs = 10
min_answers = 20

[timeouts]
boot_secs = 120
provision_secs = 600
check_secs = 60
ctl_secs = 20

[ansible]
extra_vars = { lb_package = "$LB_OLD" }
EOF

declare -A PHASE_SECS
run_phase() {
  local name=$1; shift
  local t
  t=$(now)
  echo "== $name: $*"
  if ! "$@" >"$WORK/$name.log" 2>&1; then
    sed 's/^/  /' "$WORK/$name.log" | tail -60
    echo "demo.sh: $name failed" >&2
    exit 1
  fi
  grep -E '^\[[0-9]+/[0-9]+\]|^done in|provisioned in' "$WORK/$name.log" | sed 's/^/  /' || true
  PHASE_SECS[$name]=$(since "$t")
}

run_phase up "$DEPLOYER" -c "$CFG" up
KEY=$("$DEPLOYER" -c "$CFG" --json machines list | python3 -c 'import json, sys; print(json.load(sys.stdin)["ssh_key"])')
SSH=(ssh -i "$KEY" -o IdentitiesOnly=yes -o BatchMode=yes
  -o UserKnownHostsFile="$WORK/state/known_hosts" -o StrictHostKeyChecking=accept-new)
addr_of() { "$DEPLOYER" -c "$CFG" --json machines list | python3 -c "
import json, sys
print(next(m['address'] for m in json.load(sys.stdin)['machines'] if m['label'] == '$1'))"; }

echo "== the DNS hierarchy: parent zone server and resolver"
t=$(now)
"$DEPLOYER" -c "$CFG" machines create parent resolver >"$WORK/extras.txt"
PARENT=$(awk '$1 == "parent" { print $2 }' "$WORK/extras.txt")
RESOLVER=$(awk '$1 == "resolver" { print $2 }' "$WORK/extras.txt")
echo "$PARENT" >"$WORK/parent-address"
# roll-lb checks the delegation at the parent zone's server before it drains the old lbs.
sed -i "s/^\[roll_lb\]\$/[roll_lb]\nparent_servers = [\"$PARENT\"]/" "$CFG"
LB1=$(addr_of lb1)
LB2=$(addr_of lb2)
python3 - "$WORK" "$PARENT" "$RESOLVER" "$LB1" "$LB2" "$SECRET" "10.$NET.0.1/32" "$KEY" <<'EOF'
import json, sys
work, parent, resolver, lb1, lb2, secret, admin, key = sys.argv[1:]
common = {
    "ansible_user": "root",
    "ansible_ssh_private_key_file": key,
    "ansible_ssh_common_args": f"-o UserKnownHostsFile={work}/state/known_hosts -o StrictHostKeyChecking=accept-new",
    "ansible_python_interpreter": "/usr/bin/python3",
}
inv = {"all": {"children": {
    "parent": {"hosts": {"parent": dict(common, ansible_host=parent)}},
    "resolver": {"hosts": {"resolver": dict(common, ansible_host=resolver)}},
}}}
json.dump(inv, open(f"{work}/rehearsal-inventory.json", "w"))
json.dump({
    "dns_zones": [{"name": "example.test", "file": "example.test.zone"}],
    "admin_networks": [admin],
    "rehearsal_parent_delegation": [
        {"name": "lb1.ns.test", "address": lb1},
        {"name": "lb2.ns.test", "address": lb2},
    ],
    "rehearsal_parent_update_key": {"name": "rehearsal-update", "algorithm": "hmac-sha256", "secret": secret},
}, open(f"{work}/rehearsal-vars.json", "w"))
EOF
chmod 600 "$WORK/rehearsal-vars.json"
ANSIBLE_CONFIG="$WORK/ansible/ansible.cfg" ansible-playbook -i "$WORK/rehearsal-inventory.json" \
  -e "@$WORK/rehearsal-vars.json" "$WORK/ansible/rehearsal.yml" >"$WORK/hierarchy.log" 2>&1 \
  || { tail -40 "$WORK/hierarchy.log"; exit 1; }
for _ in $(seq 1 100); do
  [ "$(dig +short +time=1 +tries=1 @"$RESOLVER" www.example.test A)" = "192.0.2.1" ] && break
  sleep 0.2
done
echo "  parent $PARENT serves test. (example.test -> lb1.ns.test $LB1, lb2.ns.test $LB2); resolver $RESOLVER: www.example.test -> $(dig +short @"$RESOLVER" www.example.test A)"
PHASE_SECS[hierarchy]=$(since "$t")

echo "== firewalls between machines"
NS1=$(addr_of ns1)
NS1_VLAN=$("$DEPLOYER" -c "$CFG" --json machines list | python3 -c "
import json, sys
print(next(m['private_address'] for m in json.load(sys.stdin)['machines'] if m['label'] == 'ns1'))")
fw_ok=1
# A machine that is not an lb (the resolver on the public network; ns2 on the VLAN) gets no
# answer from a nameserver; an lb does.
if "${SSH[@]}" "root@$RESOLVER" "dig +time=2 +tries=1 @$NS1 example.test SOA" >/dev/null 2>&1; then
  echo "  FAIL: the resolver got an answer from ns1 ($NS1)"; fw_ok=0
else echo "  resolver -> ns1 $NS1:53: no answer (firewall)"; fi
NS2=$(addr_of ns2)
if "${SSH[@]}" "root@$NS2" "dig +time=2 +tries=1 @$NS1_VLAN example.test SOA" >/dev/null 2>&1; then
  echo "  FAIL: ns2 got an answer from ns1 on the VLAN ($NS1_VLAN)"; fw_ok=0
else echo "  ns2 -> ns1 $NS1_VLAN:53 (VLAN): no answer (firewall)"; fi
if "${SSH[@]}" "root@$LB1" "dig +time=2 +tries=1 +short @$NS1_VLAN example.test SOA" | grep -q .; then
  echo "  lb1 -> ns1 $NS1_VLAN:53 (VLAN): answered"
else echo "  FAIL: lb1 got no answer from ns1 on the VLAN"; fw_ok=0; fi
# Metrics only from the admin network (this host).
if "${SSH[@]}" "root@$RESOLVER" "python3 -c \"import urllib.request; urllib.request.urlopen('http://$LB1:9153/metrics', timeout=2)\"" >/dev/null 2>&1; then
  echo "  FAIL: the resolver read lb1's metrics"; fw_ok=0
else echo "  resolver -> lb1 $LB1:9153 (metrics): refused (firewall)"; fi
if python3 -c "import urllib.request; urllib.request.urlopen('http://$LB1:9153/metrics', timeout=2)"; then
  echo "  host (admin network) -> lb1 $LB1:9153 (metrics): served"
else echo "  FAIL: this host cannot read lb1's metrics"; fw_ok=0; fi

lb_state() {
  for lb in lb1 lb2; do
    local a
    a=$(addr_of "$lb")
    printf '%s %s %s\n' "$lb" "$a" "$("${SSH[@]}" "root@$a" \
      "echo \$(systemctl show -p MainPID --value lb.service) \$(systemctl show -p NRestarts --value lb.service) \$(dpkg-query -W -f '\${Version}' lb)")"
  done
}

echo "== steady load: $QPS qps of the resolver's clients to $RESOLVER"
"$OUT/examples/phaseload" "$RESOLVER:53" "$WORK/queries.txt" "$QPS" steady,roll,roll-lb,upgrade,settle 8000 3600 \
  >"$WORK/load.txt" 2>"$WORK/load.err" &
LOAD_PID=$!
next_phase() { kill -USR1 "$LOAD_PID"; }
sleep "$STEADY"

next_phase
serial=$(awk '/; serial/ { print $1 }' "$ZONE")
sed -i -e "s/^\( *\)$serial ; serial/\1$((serial + 1)) ; serial/" -e 's/^www     IN A    192.0.2.1$/www     IN A    192.0.2.2/' "$ZONE"
echo "   (zone: serial $serial -> $((serial + 1)), www A 192.0.2.1 -> 192.0.2.2)"
run_phase roll "$DEPLOYER" -c "$CFG" roll
# Right after the roll every lb serves the new zone (the resolver may hold the old answer for
# its TTL, 10 s; it is asked at the end).
lb_answers=""
for lb in lb1 lb2; do lb_answers="$lb_answers $lb=$(dig +short +norec @"$(addr_of "$lb")" www.example.test A)"; done
echo "  www.example.test right after the roll:$lb_answers"
sleep 1

next_phase
run_phase roll-lb "$DEPLOYER" -c "$CFG" roll-lb
echo "  delegation now: $(dig +short +norec @"$PARENT" lb1.ns.test A) $(dig +short +norec @"$PARENT" lb2.ns.test A)"

next_phase
lb_state >"$WORK/lbs-before.txt"
run_phase upgrade "$DEPLOYER" -c "$CFG" provision-lbs --var "lb_package=$LB_NEW"

next_phase
echo "== settle: ${SETTLE}s under load after the upgrade (the watchdog interval is 10 s)"
sleep "$SETTLE"
lb_state >"$WORK/lbs-after.txt"
answer=$(dig +short @"$RESOLVER" www.example.test A)
kill -TERM "$LOAD_PID"
wait "$LOAD_PID" || true
LOAD_PID=

echo
echo "== summary"
printf '  %-8s %7s %9s %9s %9s %9s %9s %7s\n' phase sent answered servfail timeouts wrong max_ms secs
while read -r _ name _ sent _ answered _ _ _ _ _ servfail _ _ _ _ _ timeouts _ max_ms _ wrong; do
  name=${name%:}
  printf '  %-8s %7s %9s %9s %9s %9s %9s %7s\n' "$name" "$sent" "$answered" "$servfail" "$timeouts" "$wrong" "$max_ms" "${PHASE_SECS[$name]:-}"
done <"$WORK/load.txt"
if grep -q '^failures:' "$WORK/load.txt"; then
  echo "  phases started at (seconds of the load): $(grep -o 'phase [a-z-]* started at [0-9]*s' "$WORK/load.err" | sed 's/phase //; s/ started at /=/' | paste -sd' ')"
  echo "  $(grep '^failures:' "$WORK/load.txt") (second of the load:count)"
fi
echo "  www.example.test through the resolver at the end: $answer (the zone says 192.0.2.2 since the roll)"
restarts=0
while read -r lb a pid n ver; do
  read -r _ a2 pid2 n2 ver2 < <(grep "^$lb " "$WORK/lbs-after.txt")
  echo "  $lb ($a2): MainPID $pid -> $pid2, NRestarts $n -> $n2, lb $ver -> $ver2"
  [ "$n" = "$n2" ] || restarts=$((restarts + n2 - n))
  [ "$ver2" = "$VERSION-1~rehearsal2" ] || { echo "  FAIL: $lb runs lb $ver2 after the upgrade"; fw_ok=0; }
  [ "$pid" != "$pid2" ] || { echo "  FAIL: $lb's MainPID did not change: no hand-over happened"; fw_ok=0; }
done <"$WORK/lbs-before.txt"
if "${SSH[@]}" "root@$(addr_of lb1)" "journalctl -u lb --no-pager" | grep -q 'Watchdog timeout'; then
  echo "  FAIL: systemd's watchdog killed lb"; restarts=$((restarts + 1))
fi
echo "  machines (memory is each one's processes, proportional set size):"
"$DEPLOYER" -c "$CFG" machines list | sed 's/^/    /'
echo "  times: build ${T_BUILD}s, image ${T_IMAGE}s, up ${PHASE_SECS[up]}s (machines boot: $(grep -Eo 'create-(nameservers|lbs) +ok \([0-9.]+s' "$WORK/up.log" | grep -Eo '[0-9.]+s' | tr '\n' ' ')), hierarchy ${PHASE_SECS[hierarchy]}s, roll ${PHASE_SECS[roll]}s, roll-lb ${PHASE_SECS[roll-lb]}s, upgrade ${PHASE_SECS[upgrade]}s, whole run $(since "$T_START")s"
read -r _ _ _ sent _ _ _ _ _ _ _ servfail _ _ _ _ _ lost _ _ _ wrong < <(grep '^phase total:' "$WORK/load.txt")
[ "$lb_answers" = " lb1=192.0.2.2 lb2=192.0.2.2" ] || { echo "  FAIL: an lb served the old zone right after the roll:$lb_answers"; fw_ok=0; }
[ "$answer" = "192.0.2.2" ] || { echo "  FAIL: the resolver answers $answer for www.example.test at the end"; fw_ok=0; }
nleft=0
if [ -z "$KEEP" ]; then
  "$DEPLOYER" -c "$CFG" down --yes >"$WORK/down.log" 2>&1 || cat "$WORK/down.log" >&2
  left=$(leftovers)
  nleft=$(echo "$left" | wc -w)
  [ -n "$left" ] && echo "  leftovers: $left"
fi
echo "rehearsal: sent $sent, lost $lost, servfail $servfail, wrong $wrong, restarts $restarts, leftovers $nleft"
[ "$sent" -gt 0 ] && [ "$lost" -eq 0 ] && [ "$servfail" -eq 0 ] && [ "$wrong" -eq 0 ] && [ "$restarts" -eq 0 ] \
  && [ "$nleft" -eq 0 ] && [ "$fw_ok" -eq 1 ]
