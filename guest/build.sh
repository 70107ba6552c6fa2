#!/usr/bin/env bash
# Build the capsule guest: kernel + initramfs images. See guest/README.md.
#
#   guest/build.sh [--kernel capsule|debian|all] [--init PATH_TO_AGENT_BINARY] [--force]
#
# --kernel capsule: the capsule kernel (guest/kernel/build.sh: Debian's
#   linux-source-6.1, everything built in, no modules). Outputs in $OUT:
#     vmlinux              uncompressed ELF (PVH boot: qemu -kernel vmlinux)
#     vmlinuz              the same kernel as a bzImage
#     kernel.config        its .config
#     initramfs-test.img   busybox + guest/test-init.sh as /init
#     initramfs.img        the --init binary as /init, no userland (only with --init)
#     kernel-version       e.g. 6.1.192-capsule
# --kernel debian: Debian's linux-image-*-cloud-amd64 and the modules of
#   guest/modules.txt (loaded at boot). Outputs in $OUT:
#     vmlinuz, initramfs-test.img, initramfs.img, kernel-version as above
#     modules.list         modules in load order (== /etc/capsule/modules)
# --kernel all (the default): capsule in $OUT, debian in $OUT/debian.
#
# Environment:
#   CAPSULE_GUEST_OUT     output directory $OUT (default <repo>/target/guest)
#   CAPSULE_GUEST_KERNEL  default for --kernel (default all)
#   CAPSULE_KERNEL_CACHE  the capsule kernel's cache (guest/kernel/build.sh)
#   CAPSULE_KERNEL_META   kernel meta package (default linux-image-cloud-amd64)
#   CAPSULE_KERNEL_DEB    use this kernel .deb instead of downloading one
#   CAPSULE_BUSYBOX_DEB   use this busybox-static .deb instead of downloading one
set -euo pipefail

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$GUEST_DIR")
OUT=${CAPSULE_GUEST_OUT:-$ROOT/target/guest}
CACHE=$OUT/cache
KERNEL_META=${CAPSULE_KERNEL_META:-linux-image-cloud-amd64}
export LC_ALL=C
export SOURCE_DATE_EPOCH=0
umask 022

die() { echo "guest/build.sh: error: $*" >&2; exit 1; }
note() { echo "guest/build.sh: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

INIT_BIN=
FORCE=0
FLAVOUR=${CAPSULE_GUEST_KERNEL:-all}
while [ $# -gt 0 ]; do
    case $1 in
        --kernel) [ $# -ge 2 ] || die "--kernel needs capsule, debian or all"; FLAVOUR=$2; shift 2 ;;
        --kernel=*) FLAVOUR=${1#--kernel=}; shift ;;
        --init) [ $# -ge 2 ] || die "--init needs a path"; INIT_BIN=$2; shift 2 ;;
        --init=*) INIT_BIN=${1#--init=}; shift ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
if [ -n "$INIT_BIN" ]; then
    [ -f "$INIT_BIN" ] || die "--init: no such file: $INIT_BIN"
    INIT_BIN=$(readlink -f "$INIT_BIN")
fi
case $FLAVOUR in
    capsule|debian) ;;
    all)
        # the default kernel in $OUT, the Debian fallback in $OUT/debian
        args=(); [ -n "$INIT_BIN" ] && args+=(--init "$INIT_BIN"); [ "$FORCE" = 1 ] && args+=(--force)
        CAPSULE_GUEST_OUT=$OUT "${BASH_SOURCE[0]}" --kernel capsule "${args[@]}"
        CAPSULE_GUEST_OUT=$OUT/debian "${BASH_SOURCE[0]}" --kernel debian "${args[@]}"
        exit 0 ;;
    *) die "--kernel: expected capsule, debian or all, got '$FLAVOUR'" ;;
esac

# ---------------------------------------------------------------- host tools
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else die "need root to run: $*"; fi; }
need_pkgs=()
command -v depmod >/dev/null 2>&1 || [ -x /usr/sbin/depmod ] || [ -x /sbin/depmod ] || need_pkgs+=(kmod)
command -v cpio >/dev/null 2>&1 || need_pkgs+=(cpio)
command -v gzip >/dev/null 2>&1 || need_pkgs+=(gzip)
command -v xz >/dev/null 2>&1 || need_pkgs+=(xz-utils)
command -v zstd >/dev/null 2>&1 || need_pkgs+=(zstd)
command -v flock >/dev/null 2>&1 || need_pkgs+=(util-linux)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    note "installing host tools: ${need_pkgs[*]}"
    as_root apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2 \
        || { as_root apt-get update >&2 && as_root apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2; }
fi
export PATH=$PATH:/usr/sbin:/sbin
for t in apt-get apt-cache dpkg-deb depmod modprobe cpio gzip sha256sum flock; do
    command -v "$t" >/dev/null 2>&1 || die "missing host tool: $t"
done

# the capsule kernel: built (or found in its cache) by guest/kernel/build.sh
if [ "$FLAVOUR" = capsule ]; then
    KDIR=$("$GUEST_DIR/kernel/build.sh") || die "building the capsule kernel failed"
    for f in vmlinux bzImage config kernel-version; do
        [ -s "$KDIR/$f" ] || die "guest/kernel/build.sh gave $KDIR without $f"
    done
    read -r KVER <"$KDIR/kernel-version"
fi

mkdir -p "$OUT" "$CACHE/debs"
exec 9>"$OUT/.lock"
flock 9

# ------------------------------------------------------------ input packages
APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    note "running apt-get update"
    as_root apt-get update >&2
    APT_UPDATED=1
}

# resolve_pkgs: sets KPKG KVER_DEB (the kernel package the meta package pulls
# in, and its version) and BBVER (busybox-static version) from the apt lists.
# apt-cache is slow (~1 s a call here), so the answer is cached, keyed by the
# state of the apt lists: a no-op build does not call apt at all.
resolve_once() {
    if [ "$FLAVOUR" = capsule ]; then   # no kernel package: busybox only
        apt-cache show --no-all-versions busybox-static 2>/dev/null \
            | awk '/^Version: / { print "- -", $2; exit }'
        return
    fi
    apt-cache show --no-all-versions "$KERNEL_META" busybox-static 2>/dev/null | awk -v meta="$KERNEL_META" '
        /^Package: / { pkg = $2 }
        /^Version: / { ver[pkg] = $2 }
        /^Depends: / { dep[pkg] = substr($0, 10) }
        END {
            n = split(dep[meta], d, ",")
            for (i = 1; i <= n; i++)
                if (match(d[i], /linux-image-[^ ]+ *\(= *[^)]+\)/)) {
                    s = substr(d[i], RSTART, RLENGTH); gsub(/[()=]/, " ", s)
                    split(s, f, " "); k = f[1] " " f[2]; break
                }
            if (k != "" && ver["busybox-static"] != "") print k, ver["busybox-static"]
        }'
}
resolve_pkgs() {
    local key res=
    key=$( { echo "$FLAVOUR $KERNEL_META"; stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null; } | sha256sum | cut -c1-32)
    if [ -f "$CACHE/resolved" ] && [ "$(head -n1 "$CACHE/resolved")" = "$key" ]; then
        res=$(sed -n 2p "$CACHE/resolved")
    fi
    if [ -z "$res" ]; then
        res=$(resolve_once)
        [ -n "$res" ] || { apt_update_once; res=$(resolve_once); }
        [ -n "$res" ] || die "cannot resolve the packages ($FLAVOUR kernel: $KERNEL_META / busybox-static) from the apt lists"
        key=$( { echo "$FLAVOUR $KERNEL_META"; stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null; } | sha256sum | cut -c1-32)
        printf '%s\n%s\n' "$key" "$res" >"$CACHE/resolved.tmp" && mv -f "$CACHE/resolved.tmp" "$CACHE/resolved"
    fi
    read -r KPKG KVER_DEB BBVER <<<"$res"
}

# fetch_deb PKG VERSION -> prints the path of the cached .deb (fails if the
# download fails)
fetch_deb() {
    local pkg=$1 ver=$2 arch file sandbox=()
    arch=$(dpkg --print-architecture)
    file="$CACHE/debs/${pkg}_${ver//:/%3a}_${arch}.deb"
    if [ ! -s "$file" ]; then
        note "downloading $pkg=$ver"
        [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
        (cd "$CACHE/debs" && apt-get "${sandbox[@]}" download "$pkg=$ver" >&2) || return 1
        [ -s "$file" ] || { note "apt-get download did not produce $file"; return 1; }
    fi
    echo "$file"
}

fetch_all() {
    if [ "$FLAVOUR" = capsule ]; then
        KERNEL_DEB=
    elif [ -n "${CAPSULE_KERNEL_DEB:-}" ]; then
        KERNEL_DEB=$(readlink -f "$CAPSULE_KERNEL_DEB")
    else
        KERNEL_DEB=$(fetch_deb "$KPKG" "$KVER_DEB") || return 1
    fi
    if [ -n "${CAPSULE_BUSYBOX_DEB:-}" ]; then
        BUSYBOX_DEB=$(readlink -f "$CAPSULE_BUSYBOX_DEB")
    else
        BUSYBOX_DEB=$(fetch_deb busybox-static "$BBVER") || return 1
    fi
}

if { [ "$FLAVOUR" = debian ] && [ -z "${CAPSULE_KERNEL_DEB:-}" ]; } || [ -z "${CAPSULE_BUSYBOX_DEB:-}" ]; then
    resolve_pkgs
fi
if ! fetch_all; then
    # stale apt lists (e.g. the security archive dropped the old kernel):
    # refresh them, resolve again, retry once
    [ "$APT_UPDATED" = 1 ] && die "downloading the guest packages failed"
    apt_update_once
    rm -f "$CACHE/resolved"
    resolve_pkgs
    fetch_all || die "downloading the guest packages failed"
fi
[ "$FLAVOUR" = capsule ] || [ -s "$KERNEL_DEB" ] || die "kernel deb missing: $KERNEL_DEB"
[ -s "$BUSYBOX_DEB" ] || die "busybox deb missing: $BUSYBOX_DEB"

# ------------------------------------------------------------------ stamps
h() { sha256sum "$1" | cut -d' ' -f1; }
if [ "$FLAVOUR" = capsule ]; then
    KERNEL_INPUTS="vmlinux $(h "$KDIR/vmlinux") $KDIR
bzImage $(h "$KDIR/bzImage")"
else
    KERNEL_INPUTS="kernel.deb $(h "$KERNEL_DEB") $(basename "$KERNEL_DEB")
modules.txt $(h "$GUEST_DIR/modules.txt")"
fi
BASE_INPUTS=$(cat <<EOF
$KERNEL_INPUTS
busybox.deb $(h "$BUSYBOX_DEB") $(basename "$BUSYBOX_DEB")
helpers.sh $(h "$GUEST_DIR/helpers.sh")
build.sh $(h "${BASH_SOURCE[0]}")
EOF
)
TEST_STAMP="$BASE_INPUTS
test-init.sh $(h "$GUEST_DIR/test-init.sh")"
AGENT_STAMP=
[ -n "$INIT_BIN" ] && AGENT_STAMP="$BASE_INPUTS
init $(h "$INIT_BIN") $INIT_BIN"

stamp_ok() { # stamp_ok STAMPFILE CONTENT OUTPUTS...
    local sf=$1 content=$2; shift 2
    [ -f "$sf" ] && [ "$(cat "$sf")" = "$content" ] || return 1
    local o; for o in "$@"; do [ -s "$OUT/$o" ] || return 1; done
}

print_outputs() {
    local f
    for f in vmlinux vmlinuz initramfs-test.img initramfs.img kernel-version kernel.config modules.list; do
        [ -e "$OUT/$f" ] && printf '  %-50s %9s bytes\n' "$OUT/$f" "$(stat -c %s "$OUT/$f")"
    done
    return 0
}

if [ "$FLAVOUR" = capsule ]; then
    TEST_OUTS=(vmlinux vmlinuz kernel.config kernel-version initramfs-test.img)
else
    TEST_OUTS=(vmlinuz kernel-version modules.list initramfs-test.img)
fi
build_test=1 build_agent=0
[ "$FORCE" = 0 ] && stamp_ok "$OUT/.stamp-test" "$TEST_STAMP" "${TEST_OUTS[@]}" && build_test=0
if [ -n "$INIT_BIN" ]; then
    build_agent=1
    [ "$FORCE" = 0 ] && stamp_ok "$OUT/.stamp-agent" "$AGENT_STAMP" initramfs.img && build_agent=0
elif [ -f "$OUT/.stamp-agent" ] && [ "$(head -n "$(wc -l <<<"$BASE_INPUTS")" "$OUT/.stamp-agent")" != "$BASE_INPUTS" ]; then
    # the agent image was built from another kernel/modules: it no longer
    # matches vmlinuz, so drop it rather than leave a stale image around
    note "removing stale $OUT/initramfs.img (kernel/modules changed; rebuild with --init)"
    rm -f "$OUT/initramfs.img" "$OUT/.stamp-agent"
fi

if [ "$build_test" = 0 ] && [ "$build_agent" = 0 ]; then
    echo "guest image up to date ($OUT)"
    print_outputs
    exit 0
fi

# ------------------------------------------------------------------- build
TMP=$(mktemp -d "$OUT/.tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# busybox
mkdir -p "$TMP/bb"
dpkg-deb -x "$BUSYBOX_DEB" "$TMP/bb"
BUSYBOX="$TMP/bb/bin/busybox"
[ -x "$BUSYBOX" ] || die "no bin/busybox in $BUSYBOX_DEB"

# the common root filesystem
R="$TMP/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,mnt,root,etc/capsule}
chmod 1777 "$R/tmp"
chmod 0700 "$R/root"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$R/etc/passwd"
printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' >"$R/etc/group"

# The Debian kernel: vmlinuz and the modules of modules.txt (plus their
# dependencies) in $R/lib/modules, their load order in /etc/capsule/modules.
# Sets KVER, VMLINUZ, KTREE, order.
KTREE= order=()
debian_kernel_and_modules() {
    # kernel tree: extracted once per .deb into the cache (with a full depmod,
    # used only to resolve dependencies)
    KTREE="$CACHE/kernel-$(h "$KERNEL_DEB" | cut -c1-16)"
    if [ ! -f "$KTREE/.complete" ]; then
        note "extracting $(basename "$KERNEL_DEB")"
        rm -rf "$KTREE" "$KTREE.tmp"
        mkdir -p "$KTREE.tmp"
        dpkg-deb -x "$KERNEL_DEB" "$KTREE.tmp"
        touch "$KTREE.tmp/.complete"
        mv "$KTREE.tmp" "$KTREE"
    fi
    local KMODROOT= d f
    for d in "$KTREE/lib/modules" "$KTREE/usr/lib/modules"; do
        [ -d "$d" ] && KMODROOT=$d
    done
    [ -n "$KMODROOT" ] || die "no lib/modules in $KERNEL_DEB"
    local kvers
    mapfile -t kvers < <(ls "$KMODROOT")
    [ ${#kvers[@]} = 1 ] || die "expected exactly one kernel version in $KERNEL_DEB, got: ${kvers[*]}"
    KVER=${kvers[0]}
    VMLINUZ=
    for f in "$KTREE/boot/vmlinuz-$KVER" "$KTREE/usr/lib/modules/$KVER/vmlinuz" "$KTREE/lib/modules/$KVER/vmlinuz"; do
        [ -f "$f" ] && { VMLINUZ=$f; break; }
    done
    [ -n "$VMLINUZ" ] || die "no vmlinuz for $KVER in $KERNEL_DEB"
    local KBASE=${KMODROOT%/lib/modules}
    [ -f "$KMODROOT/$KVER/modules.dep" ] || depmod -b "$KBASE" "$KVER"

    # resolve the module list (dependencies first, each module once)
    local -A seen=()
    local modfiles=() line m deps kind path name
    while read -r line; do
        m=${line%%#*}; m=${m//[[:space:]]/}; m=${m//-/_}
        [ -n "$m" ] || continue
        deps=$(modprobe -C /dev/null -d "$KBASE" -S "$KVER" --show-depends "$m" 2>&1) \
            || die "module $m not found in $KVER: $deps"
        while read -r kind path _; do
            case $kind in
                builtin) note "$m is built into $KVER: skipped" ;;
                insmod)
                    name=$(basename "$path"); name=${name%%.ko*}; name=${name//-/_}
                    if [ -z "${seen[$name]:-}" ]; then
                        seen[$name]=1; order+=("$name"); modfiles+=("$path")
                    fi ;;
                *) die "unexpected modprobe output for $m: $kind $path" ;;
            esac
        done <<<"$deps"
    done <"$GUEST_DIR/modules.txt"
    [ ${#order[@]} -gt 0 ] || die "no modules resolved from guest/modules.txt"

    local src rel dst
    mkdir -p "$R/lib/modules/$KVER"
    for src in "${modfiles[@]}"; do
        rel=${src#"$KMODROOT/$KVER/"}
        dst="$R/lib/modules/$KVER/${rel%%.ko*}.ko"
        mkdir -p "$(dirname "$dst")"
        case $src in   # ship plain .ko: no need for decompression support in the guest
            *.ko) cp "$src" "$dst" ;;
            *.ko.xz) xz -dc "$src" >"$dst" ;;
            *.ko.zst) zstd -qdc "$src" >"$dst" ;;
            *.ko.gz) gzip -dc "$src" >"$dst" ;;
            *) die "unknown module file type: $src" ;;
        esac
    done
    for f in modules.builtin modules.builtin.modinfo; do
        [ -f "$KMODROOT/$KVER/$f" ] && cp "$KMODROOT/$KVER/$f" "$R/lib/modules/$KVER/"
    done
    # modules.order restricted to the shipped modules (depmod uses it to sort aliases)
    (cd "$R/lib/modules/$KVER" && find kernel -name '*.ko' | sort) >"$TMP/shipped"
    if [ -f "$KMODROOT/$KVER/modules.order" ]; then
        sed 's/\.ko\..*$/.ko/' "$KMODROOT/$KVER/modules.order" | grep -Fxf "$TMP/shipped" \
            >"$R/lib/modules/$KVER/modules.order" || true
    else
        cp "$TMP/shipped" "$R/lib/modules/$KVER/modules.order"
    fi
    depmod -b "$R" "$KVER"
    printf '%s\n' "${order[@]}" >"$R/etc/capsule/modules"
}

# The capsule kernel has everything built in: no /lib/modules, no
# /etc/capsule/modules (the agent and test-init load nothing).
[ "$FLAVOUR" = debian ] && debian_kernel_and_modules
echo "$KVER" >"$R/etc/capsule/kernel-version"

# newc entry for a character device: the kernel needs /dev/console in the
# initramfs to give /init its stdio. Written by hand so no root is needed.
newc_entry() { # NAME MODE(octal) MAJOR MINOR
    local name=$1 mode=$((8#$2)) ns=$((${#1} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
        0 "$mode" 0 0 1 0 0 0 0 "$3" "$4" "$ns" 0 "$name"
    local pad=$(( (4 - (110 + ns) % 4) % 4 ))
    head -c "$pad" /dev/zero
}
dev_nodes_cpio() {
    newc_entry dev/console 020600 5 1
    newc_entry dev/null 020666 1 3
    newc_entry TRAILER!!! 0 0 0
}

# make_image ROOTDIR OUTFILE: reproducible newc cpio, gzip -n
make_image() {
    local dir=$1 out=$2
    find "$dir" -exec touch -h -d @0 {} +
    (
        cd "$dir"
        find . -mindepth 1 -printf '%P\n' | sort \
            | cpio -o -H newc --reproducible -R 0:0 --quiet
        dev_nodes_cpio
    ) | gzip -n -9 >"$out"
}

# The test image's userland is busybox; the agent's image has none (the
# agent runs nothing from the guest root, and every byte of the initramfs
# stays in guest RAM).
if [ "$build_test" = 1 ]; then
    T="$TMP/test-root"
    cp -a "$R" "$T"
    install -m 0755 "$BUSYBOX" "$T/bin/busybox"
    while read -r applet; do
        [ "$applet" = bin/busybox ] && continue
        mkdir -p "$T/$(dirname "$applet")"
        ln -sf /bin/busybox "$T/$applet"
    done < <("$BUSYBOX" --list-full)
    install -m 0644 "$GUEST_DIR/helpers.sh" "$T/etc/capsule/helpers.sh"
    install -m 0755 "$GUEST_DIR/test-init.sh" "$T/init"
    make_image "$T" "$TMP/initramfs-test.img"
fi
if [ "$build_agent" = 1 ]; then
    install -m 0755 "$INIT_BIN" "$R/init"
    make_image "$R" "$TMP/initramfs.img"
    rm -f "$R/init"
fi

# install outputs (each rename is atomic; the stamp is written last)
if [ "$build_test" = 1 ]; then
    rm -f "$OUT/.stamp-test"
    if [ "$FLAVOUR" = capsule ]; then
        install -m 0644 "$KDIR/vmlinux" "$TMP/vmlinux"
        install -m 0644 "$KDIR/bzImage" "$TMP/vmlinuz"
        install -m 0644 "$KDIR/config" "$TMP/kernel.config"
        rm -f "$OUT/modules.list"   # left by a Debian-kernel build in this directory
    else
        install -m 0644 "$VMLINUZ" "$TMP/vmlinuz"
        cp "$R/etc/capsule/modules" "$TMP/modules.list"
        rm -f "$OUT/vmlinux" "$OUT/kernel.config"
    fi
    echo "$KVER" >"$TMP/kernel-version"
    for f in "${TEST_OUTS[@]}"; do mv -f "$TMP/$f" "$OUT/$f"; done
    printf '%s\n' "$TEST_STAMP" >"$TMP/stamp" && mv -f "$TMP/stamp" "$OUT/.stamp-test"
fi
if [ "$build_agent" = 1 ]; then
    rm -f "$OUT/.stamp-agent"
    mv -f "$TMP/initramfs.img" "$OUT/initramfs.img"
    printf '%s\n' "$AGENT_STAMP" >"$TMP/stamp" && mv -f "$TMP/stamp" "$OUT/.stamp-agent"
fi

# prune cache entries that this build did not use
for f in "$CACHE"/debs/*.deb; do
    [ "$f" = "$KERNEL_DEB" ] || [ "$f" = "$BUSYBOX_DEB" ] || rm -f "$f"
done
for d in "$CACHE"/kernel-*; do
    [ "$d" = "$KTREE" ] || rm -rf "$d"
done

if [ "$FLAVOUR" = capsule ]; then
    echo "guest image built: capsule kernel $KVER, no modules ($OUT)"
else
    echo "guest image built: Debian kernel $KVER, ${#order[@]} modules ($OUT)"
fi
print_outputs
