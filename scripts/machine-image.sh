#!/usr/bin/env bash
# Builds the base image of the deployer's `machines` provider once, from Debian packages, and
# caches it: a Debian 12 (bookworm) root file system booted by systemd-nspawn with systemd as
# PID 1. Everything the roles and the rehearsal need is preinstalled (bind9, unbound, nftables,
# openssh-server, python3 and python3-apt for Ansible), so provisioning needs no network.
# Each machine is an overlay over this directory (copy-on-write); nothing here is per machine:
# no SSH host keys (each machine gets fresh ones), an empty machine-id, named and unbound
# disabled (the roles enable what a machine runs), no timers that would reach the internet.
#
# Usage: scripts/machine-image.sh [CACHE_DIR]      (default /var/lib/lb-machines/images)
# Prints the image directory: CACHE_DIR/bookworm-HASH, HASH being this script's content, so an
# edit here builds a new image and an unchanged script reuses the cached one (seconds).
# Needs root. MACHINES_MIRROR overrides the Debian mirror (default http://deb.debian.org/debian).
set -euo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

cache="${1:-/var/lib/lb-machines/images}"
mirror="${MACHINES_MIRROR:-http://deb.debian.org/debian}"
security="${MACHINES_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
packages=(systemd systemd-sysv dbus iproute2 procps bind9 bind9-utils bind9-dnsutils unbound
  nftables openssh-server python3 python3-apt adduser)

[ "$(id -u)" -eq 0 ] || { echo "machine-image.sh: needs root (mmdebstrap, chroot)" >&2; exit 1; }
hash=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)
image="$cache/bookworm-$hash"
if [ -f "$image/etc/lb-machines-image" ]; then
  echo "$image"
  exit 0
fi

missing=()
for p in mmdebstrap systemd-container; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "machine-image.sh: installing with apt: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$cache"
# One build at a time; a second caller waits and then finds the image.
exec 9>"$cache/.lock"
flock 9
if [ -f "$image/etc/lb-machines-image" ]; then
  echo "$image"
  exit 0
fi
tmp="$image.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "machine-image.sh: building $image from $mirror (about a minute)" >&2
start=$(date +%s)
include=$(IFS=,; echo "${packages[*]}")
mmdebstrap --quiet --variant=minbase --include="$include" \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
  --customize-hook='chroot "$1" systemctl disable named.service unbound.service >/dev/null 2>&1 || true' \
  --customize-hook='for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer unbound-resolvconf.service; do chroot "$1" systemctl mask "$u" >/dev/null 2>&1 || true; done' \
  --customize-hook=': >"$1"/etc/machine-id; rm -f "$1"/var/lib/dbus/machine-id' \
  --customize-hook='rm -f "$1"/etc/resolv.conf; : >"$1"/etc/resolv.conf' \
  --customize-hook='mkdir -p "$1"/root/.ssh; chmod 700 "$1"/root/.ssh' \
  bookworm "$tmp" \
  "deb $mirror bookworm main" \
  "deb $mirror bookworm-updates main" \
  "deb $security bookworm-security main" >&2
printf 'bookworm image built by scripts/machine-image.sh (%s) on %s in %ss\n' \
  "$hash" "$(date -u +%FT%TZ)" "$(($(date +%s) - start))" >"$tmp/etc/lb-machines-image"
mv "$tmp" "$image"
trap - EXIT
# Older images (an earlier version of this script) go, unless a running machine's overlay
# still sits on one.
for old in "$cache"/bookworm-*; do
  [ "$old" = "$image" ] && continue
  case "$old" in *.tmp.*) continue ;; esac
  grep -q "lowerdir=$old" /proc/mounts || rm -rf "$old"
done
echo "machine-image.sh: built $image in $(($(date +%s) - start))s" >&2
echo "$image"
