#!/usr/bin/env bash
# Builds what `make install` ships and `make bench` measures: the shim and
# the `capsule` CLI as static, size-optimised binaries (Cargo profile `dist`:
# fat LTO, opt-level "s"; glibc linked statically, so no shared library is
# mapped). Built in their own target dir (target/dist) so the static
# RUSTFLAGS do not invalidate the host build. Prints the output directory:
#   target/dist/x86_64-unknown-linux-gnu/dist/{containerd-shim-capsule-v2,capsule}
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
out=target/dist/$target/dist

RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --profile dist -p capsule-shim --bins --target "$target" --target-dir target/dist >&2

for b in containerd-shim-capsule-v2 capsule; do
    if readelf -l "$out/$b" | grep -q 'INTERP'; then
        echo "build-dist: $out/$b is dynamically linked" >&2
        exit 1
    fi
done
echo "$out"
