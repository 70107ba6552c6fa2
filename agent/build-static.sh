#!/usr/bin/env bash
# Builds the guest agent as a static binary and packs it as /init of
# target/guest/initramfs.img (next to the capsule kernel, target/guest/vmlinux
# and vmlinuz) and of target/guest/debian/initramfs.img (Debian's kernel).
#
#   agent/build-static.sh [guest/build.sh options, e.g. --force]
#
# The agent is built in its own target dir (target/agent) so the static
# RUSTFLAGS do not invalidate the host build. Output:
#   target/agent/x86_64-unknown-linux-gnu/dist/capsule-agent
# built with the `dist` profile (fat LTO, opt-level s) and stripped: every
# byte of /init stays in guest RAM (the initramfs is a tmpfs), so size is
# memory per pod (8.3 MB with the plain release profile, 5.7 MB so).
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
bin=target/agent/$target/dist/capsule-agent

# Static glibc and libseccomp (libseccomp-dev's libseccomp.a, installed by
# scripts/install-deps.sh); no debug info (it would only grow the initramfs).
libdir=${LIBSECCOMP_LIB_PATH:-/usr/lib/x86_64-linux-gnu}
if [ ! -f "$libdir/libseccomp.a" ]; then
    echo "build-static: $libdir/libseccomp.a is missing: run scripts/install-deps.sh (libseccomp-dev)" >&2
    exit 1
fi
LIBSECCOMP_LINK_TYPE=static \
LIBSECCOMP_LIB_PATH="$libdir" \
RUSTFLAGS="-C target-feature=+crt-static" \
CARGO_PROFILE_DIST_STRIP=symbols \
    cargo build --profile dist -p capsule-agent --bin capsule-agent --target "$target" --target-dir target/agent

if readelf -l "$bin" | grep -q 'INTERP'; then
    echo "build-static: $bin is dynamically linked" >&2
    exit 1
fi
if command -v file >/dev/null; then
    file "$bin"
fi
exec guest/build.sh --init "$bin" "$@"
