# capsule guest helpers: /etc/capsule/helpers.sh (busybox sh). Source it:
#   . /etc/capsule/helpers.sh
#
# find_pci_block PCIPATH [TIMEOUT]   PCIPATH = "SS" (device 0000:00:SS.0) or
#                                    "SS/TT[/UU...]" (slot TT behind bridge SS...),
#                                    slots in hex
# find_scsi_block ID:LUN [TIMEOUT]   disk at SCSI address 0:0:ID:LUN (or H:C:ID:LUN)
# find_serial_block SERIAL [TIMEOUT] disk whose serial is SERIAL (virtio-blk
#                                    /sys/block/X/serial, or SCSI VPD page 0x80)
# scsi_rescan                        rescan every SCSI host
#
# The find_* functions print /dev/NAME and return 0, or print an error on stderr
# and return 1. They poll every 0.1 s for up to TIMEOUT seconds (default 5,
# integer) since a hot-plugged disk shows up asynchronously.

# _capsule_poll TIMEOUT CMD ARGS...: run CMD until it succeeds or TIMEOUT s pass
_capsule_poll() {
    _cp_n=$(( ${1:-5} * 10 )); shift
    while :; do
        "$@" && return 0
        [ "$_cp_n" -gt 0 ] || return 1
        _cp_n=$((_cp_n - 1))
        sleep 0.1
    done
}

# _capsule_pci_block PCIPATH: the block device of a PCI device (one try)
_capsule_pci_block() {
    _pb_dir=/sys/devices/pci0000:00
    _pb_rest=$1/
    while [ -n "$_pb_rest" ]; do
        _pb_slot=${_pb_rest%%/*}; _pb_rest=${_pb_rest#*/}
        _pb_slot=$(printf %02x "0x$_pb_slot")
        # children of a bridge are sysfs subdirectories of the bridge
        _pb_next=
        for _pb_d in "$_pb_dir"/[0-9a-f][0-9a-f][0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:$_pb_slot.0; do
            [ -d "$_pb_d" ] && _pb_next=$_pb_d
        done
        [ -n "$_pb_next" ] || return 1
        _pb_dir=$_pb_next
    done
    # virtio-blk: <pci>/virtioN/block/vdX; others: <pci>/block/X
    for _pb_b in "$_pb_dir"/block/* "$_pb_dir"/*/block/*; do
        [ -e "$_pb_b" ] && { echo "/dev/${_pb_b##*/}"; return 0; }
    done
    return 1
}

find_pci_block() {
    _pb_ok=; _pb_rest=$1/
    while [ -n "$_pb_rest" ]; do
        case ${_pb_rest%%/*} in
            [0-9a-fA-F]|[0-9a-fA-F][0-9a-fA-F]) _pb_ok=1 ;;
            *) _pb_ok=; break ;;
        esac
        _pb_rest=${_pb_rest#*/}
    done
    [ -n "$_pb_ok" ] || { echo "find_pci_block: bad PCI path '$1' (want SS or SS/TT, hex)" >&2; return 1; }
    _capsule_poll "${2:-5}" _capsule_pci_block "$1" && return 0
    echo "find_pci_block: no block device at PCI path $1" >&2
    return 1
}

_capsule_scsi_block() {
    for _sb_b in /sys/bus/scsi/devices/$1/block/*; do
        [ -e "$_sb_b" ] && { echo "/dev/${_sb_b##*/}"; return 0; }
    done
    return 1
}

find_scsi_block() {
    case $1 in
        *:*:*:*) _sb_addr=$1 ;;
        *:*) _sb_addr=0:0:$1 ;;
        *) echo "find_scsi_block: bad SCSI address '$1' (want ID:LUN)" >&2; return 1 ;;
    esac
    _capsule_poll "${2:-5}" _capsule_scsi_block "$_sb_addr" && return 0
    echo "find_scsi_block: no disk at SCSI address $_sb_addr" >&2
    return 1
}

_capsule_serial_block() {
    for _sr_b in /sys/block/*; do
        _sr_s=
        if [ -r "$_sr_b/serial" ]; then
            read -r _sr_s <"$_sr_b/serial"
        elif [ -r "$_sr_b/device/vpd_pg80" ]; then
            # VPD page 0x80: 4-byte header, then the serial number
            _sr_s=$(tail -c +5 "$_sr_b/device/vpd_pg80" | tr -d '\000')
            while [ "${_sr_s% }" != "$_sr_s" ]; do _sr_s=${_sr_s% }; done
        fi
        [ -n "$_sr_s" ] && [ "$_sr_s" = "$1" ] && { echo "/dev/${_sr_b##*/}"; return 0; }
    done
    return 1
}

find_serial_block() {
    [ -n "$1" ] || { echo "find_serial_block: empty serial" >&2; return 1; }
    _capsule_poll "${2:-5}" _capsule_serial_block "$1" && return 0
    echo "find_serial_block: no disk with serial $1" >&2
    return 1
}

scsi_rescan() {
    for _sr_h in /sys/class/scsi_host/host*/scan; do
        [ -e "$_sr_h" ] && echo '- - -' >"$_sr_h"
    done
    return 0
}
