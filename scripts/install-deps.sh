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
  linux-source-6.1 bc bison flex libelf-dev libssl-dev gcc make libc6-dev lz4 xz-utils
  e2fsprogs util-linux   # mkfs, losetup
  libcap-ng-dev libseccomp-dev pkg-config  # cargo install virtiofsd
  socat                  # poking unix sockets by hand when debugging
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

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v virtiofsd >/dev/null 2>&1 && [ ! -x "$CARGO_BIN/virtiofsd" ]; then
  log "cargo install virtiofsd (a few minutes)"
  cargo install --locked virtiofsd
else
  log "virtiofsd present"
fi

# Loop devices: tests attach their own; make sure the driver is there.
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || log "warning: no /dev/loop-control"
log "done"
