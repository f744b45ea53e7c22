#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmarks use, only what is missing:
#   - Debian packages (apt): BIND, dig, dnsperf, Prometheus and promtool, systemd-analyze,
#     dpkg-dev and lintian (Debian packages), python3-apt (the Ansible apt module), nft (the
#     firewall tests load the roles' rulesets inside network namespaces made for them),
#     systemd-container and mmdebstrap (the machines provider: systemd-nspawn, and the image
#     scripts/machine-image.sh builds), openssh-client (Ansible and lb ctl over SSH),
#     groff-base and mandoc (the manual pages are rendered and linted by lb/tests/docs.rs);
#   - Python tools (pip, in a virtualenv at .tools/venv): ansible-core and ansible-lint.
# Source it (`source scripts/install-deps.sh`) so that the virtualenv lands on PATH.
set -euo pipefail

_deps_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

_apt_pkgs=(bind9 bind9-utils dnsutils dnsperf prometheus systemd iproute2 nftables procps bc python3 python3-venv
  dpkg-dev lintian python3-apt systemd-container mmdebstrap openssh-client groff-base mandoc)
_missing=()
for p in "${_apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || _missing+=("$p")
done
if [ ${#_missing[@]} -gt 0 ]; then
  _sudo=""
  [ "$(id -u)" -ne 0 ] && _sudo="sudo"
  echo "installing with apt: ${_missing[*]}"
  $_sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -qq --no-install-recommends "${_missing[@]}" >/dev/null
fi
# Debian starts the packaged daemons on install; the tests run their own instances on free
# ports, so stop these if they run (they would hold port 53 or 9090).
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  for svc in named bind9 prometheus; do
    systemctl is-active --quiet "$svc" 2>/dev/null && systemctl stop "$svc" || true
  done
fi

_venv="$_deps_root/.tools/venv"
if [ ! -x "$_venv/bin/ansible-playbook" ] || [ ! -x "$_venv/bin/ansible-lint" ]; then
  echo "installing ansible-core and ansible-lint with pip into $_venv"
  # /usr/bin/python3 is Debian's (python3-venv); any python3 on PATH will do otherwise.
  _py=/usr/bin/python3
  [ -x "$_py" ] || _py="$(command -v python3)"
  "$_py" -m venv "$_venv"
  "$_venv/bin/pip" install -q --disable-pip-version-check "ansible-core>=2.15" "ansible-lint>=24"
fi
export PATH="$_venv/bin:$PATH"
