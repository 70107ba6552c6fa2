#!/bin/sh
# capsule test init: /init (PID 1) of target/guest/initramfs-test.img.
# Runs under busybox sh. Protocol: see guest/README.md ("Test init").
# PID 1 must never exit: every step tolerates failure.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root TERM=dumb
umask 022
cd /

log() { echo "capsule-init: $*"; }

# 1. pseudo filesystems
mkdir -p /proc /sys /dev /run /tmp
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
command exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
hostname capsule 2>/dev/null

# 3 (checked first: the KVM probe needs nothing else). capsule.probe=1 -> power off.
read -r cmdline </proc/cmdline
case " $cmdline " in
    *" capsule.probe=1 "*)
        echo CAPSULE-PROBE-OK
        poweroff -f
        sleep 5; echo o >/proc/sysrq-trigger  # not reached
        ;;
esac

# 2. modules, in the order of /etc/capsule/modules (none with the capsule
# kernel: everything is built in and the file is absent)
read -r t_init _ </proc/uptime
if [ -f /etc/capsule/modules ]; then
    while read -r m _; do
        case $m in ''|'#'*) continue ;; esac
        modprobe "$m" || log "modprobe $m failed"
    done </etc/capsule/modules
fi

# 5a. find and open the command channel before announcing READY, so that
# nothing the host sends after READY is dropped (virtio-serial discards data
# that arrives while the guest has the port closed).
CHANNEL_NAME=agent.channel.0
find_channel() {
    for p in /sys/class/virtio-ports/vport*; do
        [ -r "$p/name" ] || continue
        n=; read -r n <"$p/name"
        [ "$n" = "$CHANNEL_NAME" ] || continue
        [ -c "/dev/${p##*/}" ] || continue
        CHANNEL=/dev/${p##*/}
        return 0
    done
    return 1
}
CHANNEL=
i=0
while ! find_channel && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
# fd 3 keeps the port open for the whole life of the guest
[ -n "$CHANNEL" ] && ! command exec 3<>"$CHANNEL" && { log "cannot open $CHANNEL"; CHANNEL=; }

# 4. guest view report
echo "=== capsule guest view ==="
echo "kernel: $(uname -r)"
echo "cmdline: $cmdline"
read -r t_ready _ </proc/uptime
echo "uptime: init=${t_init}s ready=${t_ready}s"
[ -r /proc/modules ] && echo "modules: $(while read -r m _; do printf '%s ' "$m"; done </proc/modules)"
for b in /sys/block/*; do
    [ -e "$b" ] || continue
    size=0; [ -r "$b/size" ] && read -r size <"$b/size"
    case ${b##*/} in loop*|ram*) [ "$size" = 0 ] && continue ;; esac
    serial=; [ -r "$b/serial" ] && read -r serial <"$b/serial" 2>/dev/null
    echo "block: ${b##*/} sectors=$size serial=$serial dev=$(readlink -f "$b/device" 2>/dev/null)"
done
for d in /sys/bus/pci/devices/*; do
    [ -e "$d" ] || continue
    read -r ven <"$d/vendor"; read -r dev <"$d/device"; read -r cls <"$d/class"
    drv=; [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    echo "pci: ${d##*/} ${ven#0x}:${dev#0x} class=${cls#0x} driver=$drv"
done
echo "channel: ${CHANNEL:-none}"
echo "CAPSULE-TEST-INIT READY"
# boot-time measurements (guest/kernel/measure-boot.sh): power off at READY,
# like the agent's capsule.bench=ready-poweroff
case " $cmdline " in
    *" capsule.bench=ready-poweroff "*) poweroff -f ;;
esac

# 5b. command loop: a fresh sh per host connection. With no host connected the
# port reads EOF at once, so sh exits and is restarted every 0.2 s.
if [ -z "$CHANNEL" ]; then
    log "no virtio-serial port named $CHANNEL_NAME; waiting for one"
    while ! find_channel || ! command exec 3<>"$CHANNEL"; do CHANNEL=; sleep 1; done
    log "channel: $CHANNEL"
fi
while :; do
    sh <&3 >&3 2>&3 3>&-
    sleep 0.2
done

# 6. not reached; never let PID 1 exit
log "command loop ended"
sh
while :; do sleep 3600; done
