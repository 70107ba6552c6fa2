#!/usr/bin/env bash
# Installs capsule on this host:
#   /usr/local/bin/containerd-shim-capsule-v2, /usr/local/bin/capsule
#   /usr/local/libexec/capsule/virtiofsd                (the Rust virtiofsd)
#   /usr/local/share/capsule/{vmlinux,initramfs.img}   (the guest)
#   /usr/local/share/capsule/debian/{vmlinuz,initramfs.img} (the fallback kernel)
#   /etc/capsule/configuration.toml                     (not overwritten)
#
#   shim/install.sh [--profile dist|release|debug] [--prefix /usr/local] [--destdir DIR]
#
# virtiofsd goes where capsule looks first (<prefix>/libexec/capsule, next to
# the <prefix>/bin the shim runs from): a containerd started by an init
# system has no ~/.cargo/bin in its PATH, and QEMU's legacy C virtiofsd
# (/usr/lib/qemu/virtiofsd) takes another command line. It is copied from
# $VIRTIOFSD, or the first Rust virtiofsd in PATH, ~/.cargo/bin or
# /usr/libexec (scripts/install-deps.sh builds capsule's, scripts/virtiofsd/, into
# ~/.cargo/bin).
#
# Needs the binaries built (shim/build-dist.sh for `dist`, what `make
# install` ships; or cargo build [--release] -p capsule-shim) and the
# guest images (agent/build-static.sh → target/guest/{vmlinux,initramfs.img},
# target/guest/debian/{vmlinuz,initramfs.img}).
# containerd finds the shim for runtime io.containerd.capsule.v2 on its PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=dist
prefix=/usr/local
destdir=
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=$2; shift 2 ;;
        --prefix) prefix=$2; shift 2 ;;
        --destdir) destdir=$2; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

target=${CARGO_TARGET_DIR:-target}
bins=$target/$profile
if [ "$profile" = dist ]; then
    bins=$target/dist/x86_64-unknown-linux-gnu/dist
fi
bindir=$destdir$prefix/bin
libexecdir=$destdir$prefix/libexec/capsule
sharedir=$destdir$prefix/share/capsule
confdir=$destdir/etc/capsule

missing=0
for f in "$bins/containerd-shim-capsule-v2" "$bins/capsule" \
         "$target/guest/vmlinux" "$target/guest/initramfs.img" \
         "$target/guest/debian/vmlinuz" "$target/guest/debian/initramfs.img"; do
    if [ ! -f "$f" ]; then
        echo "install.sh: $f is missing" >&2
        missing=1
    fi
done
if [ "$missing" = 1 ]; then
    echo "install.sh: build first: shim/build-dist.sh (or cargo build [--release] -p capsule-shim with --profile release|debug), then agent/build-static.sh" >&2
    exit 1
fi

# A virtiofsd capsule can drive: its --help offers every flag capsule passes
# (shim/src/config/virtiofsd.rs, VIRTIOFSD_FLAGS).
rust_virtiofsd() {
    local help
    help=$("$1" --help 2>&1) || return 1
    for flag in --socket-path --shared-dir --sandbox --cache --announce-submounts; do
        grep -qE -- "(^|[[:space:],])$flag([[:space:],=<[]|\$)" <<<"$help" || return 1
    done
}
virtiofsd=${VIRTIOFSD:-}
if [ -z "$virtiofsd" ]; then
    IFS=: read -ra path_dirs <<<"${PATH:-}"
    for d in "${path_dirs[@]}" "${CARGO_HOME:-${HOME:-/root}/.cargo}/bin" /usr/libexec; do
        if [ -x "$d/virtiofsd" ] && rust_virtiofsd "$d/virtiofsd"; then
            virtiofsd=$d/virtiofsd
            break
        fi
    done
fi
if [ -z "$virtiofsd" ] || ! rust_virtiofsd "$virtiofsd"; then
    echo "install.sh: no Rust virtiofsd found${virtiofsd:+ ($virtiofsd is not one)}: scripts/virtiofsd/build.sh (or cargo install virtiofsd), or VIRTIOFSD=PATH" >&2
    exit 1
fi

install -d -m 0755 "$bindir" "$libexecdir" "$sharedir" "$sharedir/debian" "$confdir"
install -m 0755 "$bins/containerd-shim-capsule-v2" "$bindir/"
install -m 0755 "$bins/capsule" "$bindir/"
install -m 0755 "$virtiofsd" "$libexecdir/virtiofsd"
# capsule's kernel as the uncompressed ELF (QEMU boots it through PVH), and
# Debian's cloud kernel with its modules as the fallback
# ([hypervisor] kernel/initramfs in the configuration).
install -m 0644 "$target/guest/vmlinux" "$sharedir/vmlinux"
install -m 0644 "$target/guest/initramfs.img" "$sharedir/initramfs.img"
install -m 0644 "$target/guest/debian/vmlinuz" "$sharedir/debian/vmlinuz"
install -m 0644 "$target/guest/debian/initramfs.img" "$sharedir/debian/initramfs.img"
if [ -e "$confdir/configuration.toml" ]; then
    echo "install.sh: keeping the existing $confdir/configuration.toml"
else
    install -m 0644 shim/configuration.toml "$confdir/configuration.toml"
fi
echo "installed capsule into $destdir$prefix (virtiofsd from $virtiofsd; config $confdir/configuration.toml)"
