#!/usr/bin/env bash
# Prints the Debian version of a package built from a git work tree (scripts/package.sh uses it
# unless --deb-version is given):
#
#   scripts/deb-version.sh UPSTREAM [DIR]     UPSTREAM: the crate version (0.1.0); DIR: the work
#                                             tree (default: this repository)
#
# Every build of another commit, and every build of a changed tree, gets another version, and a
# later commit always a higher one, so that dpkg and the Ansible role never skip a new build as
# "already installed" (they compare versions, not contents):
#
#   0.1.0-1                         the commit tagged v0.1.0, clean: the release
#   0.1.0-1+git142.g0123456789ab    after the release: N = commits in HEAD's history (a descendant
#                                   always has more), then the commit (from `git describe`)
#   0.1.0-1~git136.g0123456789ab    before the release (no v0.1.0 tag in HEAD's history): "~"
#                                   sorts below the release itself
#   ...g0123456789ab.dirty20261128153000   uncommitted changes (`git describe --dirty`): above the
#                                   clean build of that commit, each build above the previous one
#                                   (UTC time of the build)
#
# Outside a git work tree (a source tarball), UPSTREAM-1.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: deb-version.sh UPSTREAM [DIR]" >&2; exit 2; }
upstream="$1"
dir="${2:-$(dirname "$0")/..}"
revision=1
git_() { git -C "$dir" "$@"; }

if ! git_ rev-parse --verify -q HEAD >/dev/null 2>&1; then
  echo "$upstream-$revision"
  exit 0
fi
tag="v$upstream"
describe=$(git_ describe --tags --always --dirty --abbrev=12 --match "$tag")
dirty=
case "$describe" in *-dirty) dirty=1 ;; esac
if [ "$describe" = "$tag" ]; then
  echo "$upstream-$revision"
  exit 0
fi
if git_ rev-parse --verify -q "refs/tags/$tag" >/dev/null && git_ merge-base --is-ancestor "$tag" HEAD; then
  sep="+"
else
  sep="~"
fi
count=$(git_ rev-list --count HEAD)
hash=$(git_ rev-parse --short=12 HEAD)
version="$upstream-$revision${sep}git$count.g$hash"
# DEB_VERSION_TIME (seconds since the epoch): one time for all the packages of one build.
[ -n "$dirty" ] && version="$version.dirty$(date -u -d "@${DEB_VERSION_TIME:-$(date +%s)}" +%Y%m%d%H%M%S)"
echo "$version"
