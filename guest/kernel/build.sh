#!/usr/bin/env bash
# Build the capsule guest kernel from Debian's linux-source-6.1: allnoconfig +
# guest/kernel/capsule.config, everything built in, with the patches in
# guest/kernel/patches/ (applied in name order). See guest/README.md.
#
#   guest/kernel/build.sh [--force]
#
# Prints the cache directory holding the result on stdout (the only thing it
# prints there; progress goes to stderr):
#   <dir>/vmlinux        uncompressed ELF, symbols stripped (PVH boot: -kernel)
#   <dir>/bzImage        compressed kernel (any x86 boot loader)
#   <dir>/config         the final .config
#   <dir>/kernel-version uname -r, e.g. 6.1.192-capsule
#   <dir>/inputs         what the key was computed from
#
# <dir> is $CAPSULE_KERNEL_CACHE/<key> (default /var/cache/capsule/kernel),
# where <key> hashes the linux-source-6.1 package version, the fragment, the
# patches, this script and the compiler version: a machine builds each kernel once,
# whatever the clone (make test, CI, make install). Concurrent builds queue
# on a lock. The build takes about 10 minutes on 2 cores and needs about
# 2 GB of disk while it runs (the tree is deleted afterwards).
#
# Environment:
#   CAPSULE_KERNEL_CACHE   cache root (default /var/cache/capsule/kernel)
#   CAPSULE_KERNEL_JOBS    make -j (default: nproc)
#   CAPSULE_KERNEL_KEEP    how many cache entries to keep (default 3)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
FRAGMENT="$HERE/capsule.config"
PATCHES=("$HERE"/patches/*.patch)
[ -e "${PATCHES[0]}" ] || PATCHES=()
CACHE_ROOT=${CAPSULE_KERNEL_CACHE:-/var/cache/capsule/kernel}
JOBS=${CAPSULE_KERNEL_JOBS:-$(nproc)}
KEEP=${CAPSULE_KERNEL_KEEP:-3}
SRC_PKG=linux-source-6.1
SRC_TAR=/usr/src/linux-source-6.1.tar.xz
export LC_ALL=C
umask 022

die() { echo "guest/kernel/build.sh: error: $*" >&2; exit 1; }
note() { echo "guest/kernel/build.sh: $*" >&2; }

FORCE=0
while [ $# -gt 0 ]; do
    case $1 in
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[ -f "$FRAGMENT" ] || die "no config fragment at $FRAGMENT"

# ---------------------------------------------------------------- host tools
# The kernel source and what building it needs (also in scripts/install-deps.sh).
PKGS=("$SRC_PKG" bc bison flex libelf-dev libssl-dev gcc make libc6-dev lz4 xz-utils patch)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "need root to install: ${missing[*]}"
    note "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; } \
        || die "apt-get install ${missing[*]} failed"
fi
[ -s "$SRC_TAR" ] || die "$SRC_PKG is installed but $SRC_TAR is missing"
SRC_VER=$(dpkg-query -W -f='${Version}' "$SRC_PKG")

# ------------------------------------------------------------------ the key
h() { sha256sum "$1" | cut -d' ' -f1; }
INPUTS=$(cat <<EOF
$SRC_PKG $SRC_VER
capsule.config $(h "$FRAGMENT")
$(for p in "${PATCHES[@]}"; do echo "patch $(basename "$p") $(h "$p")"; done)
build.sh $(h "$SELF")
gcc $(gcc -dumpfullversion) $(dpkg-query -W -f='${Version}' "gcc-$(gcc -dumpversion)" 2>/dev/null || echo '?')
EOF
)
KEY=$(printf '%s\n' "$INPUTS" | sha256sum | cut -c1-24)
DIR="$CACHE_ROOT/$KEY"
OUTS=(vmlinux bzImage config kernel-version inputs)

complete() {
    [ -f "$DIR/.complete" ] || return 1
    local f; for f in "${OUTS[@]}"; do [ -s "$DIR/$f" ] || return 1; done
}
if [ "$FORCE" = 0 ] && complete; then
    touch "$DIR/.complete"      # recently used: kept by the pruning below
    echo "$DIR"
    exit 0
fi

mkdir -p "$CACHE_ROOT" || die "cannot create $CACHE_ROOT (set CAPSULE_KERNEL_CACHE)"
exec 9>"$CACHE_ROOT/.lock"
if ! flock -n 9; then
    note "another kernel build holds $CACHE_ROOT/.lock: waiting"
    flock 9
fi
# somebody else may have built it while we waited
if [ "$FORCE" = 0 ] && complete; then
    echo "$DIR"
    exit 0
fi

# -------------------------------------------------------------------- build
START=$(date +%s)
WORK="$CACHE_ROOT/.build-$KEY"
rm -rf "$WORK" "$DIR"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
note "building the capsule kernel ($SRC_PKG $SRC_VER, key $KEY) in $WORK"
tar -xJf "$SRC_TAR" -C "$WORK"
KSRC="$WORK/linux-source-6.1"
[ -f "$KSRC/Makefile" ] || die "unexpected layout of $SRC_TAR (no linux-source-6.1/Makefile)"
for p in "${PATCHES[@]}"; do
    note "applying $(basename "$p")"
    patch -d "$KSRC" -p1 --forward --batch --quiet <"$p" || die "patch $p does not apply to $SRC_PKG $SRC_VER"
done

# Reproducible: no user, host, date or build count in the image.
export KBUILD_BUILD_USER=capsule KBUILD_BUILD_HOST=capsule KBUILD_BUILD_VERSION=1
export KBUILD_BUILD_TIMESTAMP="1970-01-01 00:00:00 UTC"
export ARCH=x86_64
MAKE=(make -C "$KSRC" ARCH=x86_64 -s)

# allnoconfig with the fragment as KCONFIG_ALLCONFIG (merge_config.sh -n)
(cd "$KSRC" && scripts/kconfig/merge_config.sh -n "$FRAGMENT" >"$WORK/merge.log" 2>&1) \
    || { cat "$WORK/merge.log" >&2; die "merging $FRAGMENT failed"; }

# Every line of the fragment must be in the final .config as written.
# Symbols are also checked to exist in this kernel's Kconfig, so that a
# typo in a "# ... is not set" line does not pass silently.
find "$KSRC" -name 'Kconfig*' -print0 \
    | xargs -0 grep -hoE '^[[:space:]]*(menu)?config[[:space:]]+[A-Za-z0-9_]+' \
    | awk '{print "CONFIG_" $2}' | sort -u >"$WORK/symbols"
bad=0
declare -A wanted=()
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        sym=${BASH_REMATCH[1]} want=$line
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        sym=${BASH_REMATCH[1]} want=
    else
        continue
    fi
    if [ -n "${wanted[$sym]+x}" ]; then
        note "config: $sym appears twice in the fragment"; bad=1
    fi
    wanted[$sym]=1
    if ! grep -qxF "$sym" "$WORK/symbols"; then
        note "config: $sym does not exist in $SRC_PKG $SRC_VER"; bad=1; continue
    fi
    got=$(grep -E "^($sym=|# $sym is not set$)" "$KSRC/.config" || true)
    if [ -n "$want" ]; then
        [ "$got" = "$want" ] || { note "config: want $want, got ${got:-nothing (dependencies missing?)}"; bad=1; }
    else
        case $got in ''|"# $sym is not set") ;; *) note "config: want $sym off, got $got"; bad=1 ;; esac
    fi
done <"$FRAGMENT"
[ "$bad" = 0 ] || die "the final .config does not match $FRAGMENT (see above)"
note "config: all ${#wanted[@]} options of the fragment are set as requested"

note "make -j$JOBS bzImage"
"${MAKE[@]}" -j"$JOBS" bzImage >"$WORK/make.log" 2>&1 \
    || { tail -n 60 "$WORK/make.log" >&2; die "kernel build failed"; }
KREL=$("${MAKE[@]}" kernelrelease)
[ -n "$KREL" ] || die "empty kernelrelease"

TMPDIR_OUT="$CACHE_ROOT/.out-$KEY"
rm -rf "$TMPDIR_OUT"
mkdir -p "$TMPDIR_OUT"
# vmlinux without its symbol table: QEMU's PVH loader reads only the load
# segments and the ELF notes (kallsyms lives in the image itself)
objcopy --strip-all "$KSRC/vmlinux" "$TMPDIR_OUT/vmlinux"
readelf -n "$TMPDIR_OUT/vmlinux" | grep -q 'Xen.*0x00000012' \
    || die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
cp "$KSRC/arch/x86/boot/bzImage" "$TMPDIR_OUT/bzImage"
cp "$KSRC/.config" "$TMPDIR_OUT/config"
echo "$KREL" >"$TMPDIR_OUT/kernel-version"
printf '%s\n' "$INPUTS" >"$TMPDIR_OUT/inputs"
touch "$TMPDIR_OUT/.complete"
mv "$TMPDIR_OUT" "$DIR"

# keep the $KEEP most recently used entries
ls -1dt "$CACHE_ROOT"/*/ 2>/dev/null | tail -n +"$((KEEP + 1))" | while read -r old; do
    note "pruning old cache entry $old"
    rm -rf "$old"
done

note "built $KREL in $(( $(date +%s) - START )) s: $(stat -c %s "$DIR/vmlinux") bytes vmlinux, $(stat -c %s "$DIR/bzImage") bytes bzImage"
echo "$DIR"
