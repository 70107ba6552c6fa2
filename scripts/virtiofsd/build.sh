#!/usr/bin/env bash
# Builds capsule's virtiofsd: the Rust virtiofsd 1.14.0 from crates.io with
# the patches in this directory, and installs it as $CARGO_HOME/bin/virtiofsd
# (where `cargo install virtiofsd` puts the stock one, and where capsule's
# lookup and shim/install.sh find it).
#
#   0001-negative-timeout.patch  --negative-timeout=SECS: a lookup of a
#       missing name is answered with a negative entry (inode 0) the guest
#       may cache for SECS, instead of ENOENT, which the guest kernel never
#       caches. Without it every open or stat of a missing file in a
#       container (glibc's /etc/localtime on each localtime(), PATH and
#       library searches) is a round trip to the host (make bench, figure
#       6b). The shim passes --negative-timeout=1 (--cache=auto's timeout for
#       names that exist) when the binary offers it.
#
# Idempotent: does nothing when the installed virtiofsd already offers every
# patched flag. The crate is fetched by its pinned checksum.
set -euo pipefail

VERSION=1.14.0
SHA256=7051accc9cf2816e25945c8216e6d4be2b4e75fc5e77559cd7eed5e400245cc1
URL=https://static.crates.io/crates/virtiofsd/virtiofsd-$VERSION.crate
here=$(cd "$(dirname "$0")" && pwd)
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
CACHE=${CAPSULE_VIRTIOFSD_CACHE:-/var/cache/capsule/virtiofsd}

log() { printf '[virtiofsd] %s\n' "$*"; }
# The installed virtiofsd offers the patched flag (--help read whole: a
# grep -q that stops early would fail the pipeline under pipefail).
patched() {
  local help
  help=$("$CARGO_BIN/virtiofsd" --help 2>/dev/null) || return 1
  grep -q -- '--negative-timeout' <<<"$help"
}

if [ -x "$CARGO_BIN/virtiofsd" ] && patched; then
  log "capsule's virtiofsd present ($CARGO_BIN/virtiofsd)"
  exit 0
fi

mkdir -p "$CACHE"
crate=$CACHE/virtiofsd-$VERSION.crate
if ! echo "$SHA256  $crate" | sha256sum -c --status 2>/dev/null; then
  log "fetching $URL"
  curl -fsSL --retry 3 -o "$crate.tmp" "$URL"
  echo "$SHA256  $crate.tmp" | sha256sum -c --status \
    || { log "checksum mismatch for $URL (expected $SHA256)"; rm -f "$crate.tmp"; exit 1; }
  mv "$crate.tmp" "$crate"
fi

src=$(mktemp -d "$CACHE/src.XXXXXX")
trap 'rm -rf "$src"' EXIT
tar -xzf "$crate" -C "$src"
for p in "$here"/*.patch; do
  log "applying $(basename "$p")"
  patch -d "$src/virtiofsd-$VERSION" -p1 --quiet --forward < "$p"
done
log "building virtiofsd $VERSION with capsule's patches (about a minute)"
CARGO_TARGET_DIR="$CACHE/target" cargo install --locked --force --path "$src/virtiofsd-$VERSION" --root "${CARGO_HOME:-$HOME/.cargo}"
patched || { log "the installed virtiofsd offers no --negative-timeout"; exit 1; }
log "installed $CARGO_BIN/virtiofsd"
