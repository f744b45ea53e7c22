#!/usr/bin/env bash
# Installs the Debian and Python packages the tests, the demo and the benchmarks use.
# Safe to re-run: it only installs what is missing.
set -euo pipefail

apt_pkgs=(bind9 bind9-utils dnsutils dnsperf prometheus systemd iproute2 procps)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian packages may start daemons that hold port 53 or 9090; the tests use their own
# instances on free ports, so these are not needed.
for svc in named bind9 prometheus; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done
