#!/usr/bin/env bash
# Installs everything capsule's build, tests and demo need on a fresh Debian 12
# machine. Idempotent: a second run only checks. Needs root (apt-get).
set -euo pipefail

log() { printf '[install-deps] %s\n' "$*"; }

APT_PACKAGES=(
  qemu-system-x86        # the VM monitor
  qemu-system-common     # qemu-storage-daemon (vhost-user-blk backend in tests)
  containerd runc        # end-to-end tests and the demo run a private containerd
  busybox-static         # guest userland and test images
  kmod cpio              # guest image build (depmod, initramfs)
  # the capsule guest kernel (guest/kernel/build.sh): source and build tools
  linux-source-6.1 bc bison flex libelf-dev libssl-dev gcc make libc6-dev lz4 xz-utils patch
  e2fsprogs util-linux   # mkfs, losetup
  libcap-ng-dev libseccomp-dev pkg-config  # virtiofsd's build (scripts/virtiofsd); the agent links libseccomp.a
  socat                  # poking unix sockets by hand when debugging
  curl                   # HTTP from the node side in network tests (busybox 1.35's static wget crashes with -T); fetching the virtiofsd crate
  iproute2               # ip/tc: network test fixtures (namespaces, veths, qdiscs)
  containernetworking-plugins  # CNI plugins (network tests)
  protobuf-compiler      # protoc: the k8s-cri crate's build (CRI client of the Sandbox API test)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: qemu recommends a desktop's worth of GUI packages.
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "apt packages present"
fi

# capsule's virtiofsd: the Rust virtiofsd with the patches in
# scripts/virtiofsd/ (negative lookups cached), as $CARGO_HOME/bin/virtiofsd.
"$(dirname "$0")/virtiofsd/build.sh"

# containerd 1.7 and 2.x for the end-to-end tests (CAPSULE_CONTAINERD=1.7|2.1,
# tests/src/containerd.rs): Debian's own builds, from trixie and sid, fetched with
# `apt-get download` through a private sources list and unpacked with
# `dpkg -x` into $CONTAINERD_CACHE/<version>/, with a <major.minor> symlink.
# Nothing system-wide changes: no apt source is added, no package installed,
# the apt lists live under $CONTAINERD_CACHE/.apt. Their binaries run on
# bookworm (they need glibc >= 2.34); bookworm's runc stays (sid's runc needs
# a newer glibc). bookworm's containerd 1.6 comes from apt above.
#
# Pinned to what `apt-cache policy containerd` showed through the private
# lists (2026-12-07): trixie 1.7.24~ds1-6+deb13u1, sid 2.1.9+ds1-5. When sid
# moves on, this fails naming the version it now carries: update the pin.
CONTAINERD_CACHE=${CAPSULE_CONTAINERD_CACHE:-/var/cache/capsule/containerd}
CONTAINERD_PINS=(
  "1.7 trixie 1.7.24~ds1-6+deb13u1"
  "2.1 sid 2.1.9+ds1-5"
)

# The Debian mirror the host's own sources use (deb.debian.org otherwise).
debian_mirror() {
  local uri
  uri=$(grep -hoE '(https?://[^ ]+/debian)/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
          /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | tr -d ' ' || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# apt-get/apt-cache with a private state for one suite.
private_apt() {
  local dir=$1; shift
  local cmd=$1; shift
  "$cmd" -q -o Dir::Etc::SourceList="$dir/sources.list" \
    -o Dir::Etc::SourceParts="$dir/sources.list.d" \
    -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts="$dir/preferences.d" \
    -o Dir::State::Lists="$dir/lists" -o Dir::Cache="$dir/cache" \
    -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false \
    -o Acquire::Languages=none -o APT::Sandbox::User=root "$@"
}

# containerd_version_ok BIN WANT: `BIN --version` names upstream version WANT.
containerd_version_ok() {
  [ -x "$1" ] && "$1" --version 2>/dev/null | grep -qF " $2"
}

fetch_containerd() {
  local short=$1 suite=$2 version=$3
  local dest=$CONTAINERD_CACHE/$version upstream=${version%%[~+]*}
  if containerd_version_ok "$dest/usr/bin/containerd" "$upstream" && [ -x "$dest/usr/bin/ctr" ] \
     && [ "$(readlink "$CONTAINERD_CACHE/$short")" = "$version" ]; then
    log "containerd $version present ($dest)"
    return
  fi
  local apt=$CONTAINERD_CACHE/.apt/$suite
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/sources.list.d" "$apt/preferences.d"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_mirror) $suite main" \
    > "$apt/sources.list"
  log "containerd $version: apt-get update ($suite, private lists in $apt)"
  private_apt "$apt" apt-get update >/dev/null
  local candidate
  candidate=$(private_apt "$apt" apt-cache policy containerd | awk '/Candidate:/ {print $2}')
  if ! private_apt "$apt" apt-cache show "containerd=$version" >/dev/null 2>&1; then
    echo "install-deps: $suite no longer carries containerd $version (apt-cache policy: candidate $candidate);" \
         "update CONTAINERD_PINS in $0" >&2
    exit 1
  fi
  local tmp
  tmp=$(mktemp -d "$CONTAINERD_CACHE/.fetch.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  log "containerd $version: apt-get download ($suite)"
  (cd "$tmp" && private_apt "$apt" apt-get download "containerd=$version" >/dev/null)
  local deb
  deb=$(ls "$tmp"/containerd_*.deb)
  [ "$(dpkg-deb -f "$deb" Version)" = "$version" ] || { echo "install-deps: $deb is not containerd $version" >&2; exit 1; }
  dpkg -x "$deb" "$tmp/root"
  containerd_version_ok "$tmp/root/usr/bin/containerd" "$upstream" \
    || { echo "install-deps: containerd $version from $suite does not run here" >&2; exit 1; }
  printf 'suite=%s\nversion=%s\nsha256=%s\n' "$suite" "$version" "$(sha256sum "$deb" | cut -d' ' -f1)" \
    > "$tmp/root/.capsule-source"
  rm -rf "$dest"
  mv "$tmp/root" "$dest"
  ln -sfn "$version" "$CONTAINERD_CACHE/$short"
  log "containerd $version unpacked into $dest ($CONTAINERD_CACHE/$short)"
}

mkdir -p "$CONTAINERD_CACHE"
for pin in "${CONTAINERD_PINS[@]}"; do
  # shellcheck disable=SC2086
  fetch_containerd $pin
done

# Loop devices: tests attach their own; make sure the driver is there.
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || log "warning: no /dev/loop-control"
log "done"
