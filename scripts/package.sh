#!/usr/bin/env bash
# Builds the Debian packages of lb and deployer with cargo-deb and prints the path of each
# package built, one per line (stdout; everything else goes to stderr).
#
#   scripts/package.sh                  release build (thin LTO), packages in target/debian/
#   scripts/package.sh --lintian        the same, then lintian on both packages
#
# Options:
#   --profile NAME     cargo profile of the binaries (default: release)
#   --no-build         package the binaries already built for --profile instead of building;
#                      the tests package the debug build they already have, in seconds:
#                      --profile dev --no-build --fast --output target/debian-test
#   --fast             lighter xz compression (bigger .deb, faster)
#   --dbgsym           also build lb-dbgsym/deployer-dbgsym .ddeb packages with the debug
#                      symbols (the release profile has debug info); by default the binaries
#                      are stripped and the symbols dropped. lintian is not run on the .ddeb
#                      (cargo-deb's lack a copyright file and changelog).
#   --deb-version V    this Debian version instead of the one from git (scripts/deb-version.sh:
#                      CARGO_VERSION-1 at the release tag v$CARGO_VERSION, else
#                      CARGO_VERSION-1{~|+}gitN.gHASH[.dirtyTIME], higher for every later
#                      commit and every build of a changed tree)
#   --output DIR       where the .debs go (default: target/debian)
#   --lintian          run lintian on the packages (installs it with apt if missing)
#
# Installs what it needs when missing: cargo-deb (pinned, `cargo install --locked`) and
# dpkg-dev (dpkg-shlibdeps, for the libc dependency) with apt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

# The version whose systemd-units options (enable/start/restart-after-upgrade/stop-on-upgrade)
# and maintainer-script fragments the lb package relies on; bump it deliberately.
CARGO_DEB_VERSION=3.8.0

profile=release
no_build=
fast=
dbgsym=
deb_version=
output="$ROOT/target/debian"
lintian=
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --no-build) no_build=1; shift ;;
    --fast) fast=1; shift ;;
    --dbgsym) dbgsym=1; shift ;;
    --deb-version) deb_version="$2"; shift 2 ;;
    --output) output="$2"; shift 2 ;;
    --lintian) lintian=1; shift ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "package.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

apt_install() {
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "package.sh: installing with apt: $*" >&2
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >&2
}

# cargo-deb: the pinned version from PATH, else installed. A different version already on PATH
# is left alone and the pinned one goes to .tools/cargo-deb (git-ignored).
cargo_deb=""
if command -v cargo-deb >/dev/null && [ "$(cargo-deb --version 2>/dev/null)" = "cargo-deb $CARGO_DEB_VERSION" ]; then
  cargo_deb="$(command -v cargo-deb)"
elif [ -x "$ROOT/.tools/cargo-deb/bin/cargo-deb" ] \
  && [ "$("$ROOT/.tools/cargo-deb/bin/cargo-deb" --version)" = "cargo-deb $CARGO_DEB_VERSION" ]; then
  cargo_deb="$ROOT/.tools/cargo-deb/bin/cargo-deb"
else
  install_root=()
  if command -v cargo-deb >/dev/null; then
    install_root=(--root "$ROOT/.tools/cargo-deb")
    cargo_deb="$ROOT/.tools/cargo-deb/bin/cargo-deb"
  else
    cargo_deb="${CARGO_HOME:-$HOME/.cargo}/bin/cargo-deb"
  fi
  echo "package.sh: installing cargo-deb $CARGO_DEB_VERSION" >&2
  cargo install -q cargo-deb --version "$CARGO_DEB_VERSION" --locked "${install_root[@]}" >&2
fi
command -v dpkg-shlibdeps >/dev/null || apt_install dpkg-dev

if [ -z "$no_build" ]; then
  echo "package.sh: cargo build --profile $profile -p lb -p deployer" >&2
  cargo build --locked --profile "$profile" -p lb -p deployer >&2
fi

# cargo-deb deletes the other versions of a package from TARGET/debian on every run, whatever
# --output says, and keeps its scratch files in TARGET/lb, TARGET/deployer. When the packages go
# elsewhere (the tests), it runs on a scratch target dir holding hard links to the binaries, so
# the release packages in target/debian survive.
metadata=$(cargo metadata --no-deps --format-version 1)
target_dir=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' <<<"$metadata")
crate_version() {
  python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == sys.argv[1]))' "$1" <<<"$metadata"
}
mkdir -p "$output"
output="$(cd "$output" && pwd)"
case "$profile" in dev) profile_dir=debug ;; *) profile_dir="$profile" ;; esac
deb_env=()
deb_target="$target_dir"
if [ "$output" != "$target_dir/debian" ]; then
  stage="$(mktemp -d "${TMPDIR:-/tmp}/lb-package.XXXXXX")"
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage/$profile_dir"
  for b in lb deployer; do
    [ -x "$target_dir/$profile_dir/$b" ] || { echo "package.sh: $target_dir/$profile_dir/$b is not built" >&2; exit 1; }
    ln "$target_dir/$profile_dir/$b" "$stage/$profile_dir/$b" 2>/dev/null \
      || cp "$target_dir/$profile_dir/$b" "$stage/$profile_dir/$b"
  done
  deb_env=(env CARGO_TARGET_DIR="$stage")
  deb_target="$stage"
fi

# The deployer's example configs as installed in /usr/share/doc/deployer/examples: the same
# files, with the paths of the installed packages instead of the repository's (the Ansible tree
# in /usr/share/deployer/ansible, /usr/bin/lb, the state next to the copied config), so that a
# copy works from wherever it is put. Built next to the binaries, where the asset list of
# deployer/Cargo.toml takes them from (target/release/... is the profile's directory).
examples="$deb_target/$profile_dir/deployer-examples"
rm -rf "$examples"
mkdir -p "$examples"
for f in deployer/examples/*.toml; do
  sed -e 's#^ansible_dir = .*#ansible_dir = "/usr/share/deployer/ansible"#' \
      -e 's#^lb_binary = .*#lb_binary = "/usr/bin/lb"#' \
      -e 's#^state_dir = "\.\./\.\./\(.*\)"#state_dir = "\1"#' \
      -e 's#^registry_dir = "\.\./\.\./\(.*\)"#registry_dir = "\1"#' \
      -e 's#"\.\./\.\./target/debian/lb[^"]*\.deb"#"lb.deb"#' \
      "$f" >"$examples/$(basename "$f")"
done

deb_args=(--no-build --profile "$profile" --output "$output")
[ -n "$fast" ] && deb_args+=(--fast)
if [ -n "$dbgsym" ]; then deb_args+=(--dbgsym); else deb_args+=(--strip); fi
debs=()
# One build time for the versions of a dirty tree: lb and deployer get the same version.
export DEB_VERSION_TIME="${DEB_VERSION_TIME:-$(date +%s)}"
for pkg in lb deployer; do
  version="$deb_version"
  [ -n "$version" ] || version=$("$ROOT/scripts/deb-version.sh" "$(crate_version "$pkg")" "$ROOT")
  echo "package.sh: $pkg $version" >&2
  # cargo-deb prints the path of each package it wrote (.deb, and .ddeb with --dbgsym).
  built=$("${deb_env[@]}" "$cargo_deb" deb -p "$pkg" "${deb_args[@]}" --deb-version "$version" \
    | grep -E '\.d?deb$' || true)
  case "$built" in
    *.deb*) ;;
    *) echo "package.sh: cargo-deb did not report a package for $pkg" >&2; exit 1 ;;
  esac
  while IFS= read -r path; do debs+=("$path"); done <<<"$built"
  # A name that stays the same across versions (what deployer/examples/linode.toml and the
  # lb role's lb_package can name): a link to the package just built.
  for path in $built; do
    case "$path" in */"${pkg}_"*.deb) ln -sfn "$(basename "$path")" "$(dirname "$path")/$pkg.deb" ;; esac
  done
done

if [ -n "$lintian" ]; then
  command -v lintian >/dev/null || apt_install lintian
  # Tags the packages override are justified in lb/dist/lintian-overrides and
  # deployer/dist/lintian-overrides; anything else is a failure.
  lints=()
  for d in "${debs[@]}"; do case "$d" in *.deb) lints+=("$d") ;; esac; done
  lintian --fail-on error,warning --pedantic --display-info "${lints[@]}" >&2
fi
printf '%s\n' "${debs[@]}"
