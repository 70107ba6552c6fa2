#!/usr/bin/env python3
"""Boot the capsule test guest under QEMU and check it end to end.

    guest/smoke-test.py [--out DIR] [--kernel FILE] [--accel tcg|kvm] [--keep]

Needs qemu-system-x86_64 and the images from guest/build.sh (default
target/guest: the capsule kernel; target/guest/debian: the Debian kernel).
--kernel picks the kernel file in DIR: vmlinuz (default, bzImage) or vmlinux
(the capsule kernel's ELF, booted through PVH).
Checks: capsule.probe=1 powers off; boot to READY; command channel (run,
disconnect, reconnect); the drivers and filesystems capsule needs are there
(built in, or loaded from /etc/capsule/modules); QMP hotplug of a virtio-blk
disk behind a PCI bridge and of a SCSI disk, found with the helpers in
/etc/capsule/helpers.sh. Exit status 0 when everything passed.
"""
import argparse, json, os, re, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What capsule needs from the guest kernel, as the guest shows it: a driver
# registered on its bus, or a filesystem in /proc/filesystems. The same
# whether built in (capsule kernel) or loaded as a module (Debian kernel).
REQUIRED_DRIVERS = [
    "pci/drivers/virtio-pci", "platform/drivers/virtio-mmio",
    "virtio/drivers/virtio_blk", "virtio/drivers/virtio_scsi", "scsi/drivers/sd",
    "virtio/drivers/virtio_console", "virtio/drivers/vmw_vsock_virtio_transport",
    "virtio/drivers/virtiofs", "virtio/drivers/virtio_rng",
    "acpi/drivers/nfit", "nd/drivers/nd_pmem",
]
REQUIRED_FS = ["fuse", "virtiofs", "overlay", "ext4", "tmpfs", "devtmpfs", "cgroup2"]
failures = []


def check(ok, what):
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def qemu_base(args, tmp, log, append):
    return ["qemu-system-x86_64", "-accel", args.accel, "-m", "512", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", os.path.join(args.out, args.kernel),
            "-initrd", os.path.join(args.out, "initramfs-test.img"),
            "-append", "console=ttyS0 panic=-1 quiet " + append,
            "-serial", "file:" + log]


def wait_for(path, pattern, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(path, "rb") as f:
                if pattern in f.read():
                    return True
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


class Channel:
    """Host side of the test-init command channel (framing done here)."""
    seq = 0

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.s.settimeout(60)
        self.buf = b""
        # a blank line ends any partial command left by an earlier client
        self.s.sendall(b"\n")

    def run(self, cmd):
        Channel.seq += 1
        tag = "%d_%d" % (os.getpid(), Channel.seq)
        self.s.sendall(("echo __BEGIN_%s__; %s\necho __END_%s__ $?\n" % (tag, cmd, tag)).encode())
        pat = re.compile(rb"__BEGIN_%s__\n(.*?)__END_%s__ (\d+)\n" % (tag.encode(), tag.encode()), re.S)
        while True:
            m = pat.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return int(m.group(2)), m.group(1).decode(errors="replace")
            data = self.s.recv(65536)
            if not data:
                raise EOFError("channel closed")
            self.buf += data

    def close(self):
        self.s.close()


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.s.settimeout(30)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" not in r:
                return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("CAPSULE_GUEST_OUT", os.path.join(ROOT, "target/guest")))
    ap.add_argument("--kernel", default="vmlinuz", help="kernel file in --out (vmlinuz or vmlinux)")
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="capsule-guest-smoke.")
    kver = open(os.path.join(args.out, "kernel-version")).read().strip()

    # 1. KVM-works probe: prints CAPSULE-PROBE-OK and powers off
    log = os.path.join(tmp, "probe.log")
    t0 = time.time()
    rc = subprocess.run(qemu_base(args, tmp, log, "capsule.probe=1"), timeout=120).returncode
    dt = time.time() - t0
    check(rc == 0 and b"CAPSULE-PROBE-OK" in open(log, "rb").read(),
          "capsule.probe=1 prints CAPSULE-PROBE-OK and qemu exits (%.1f s)" % dt)

    # 2. full boot
    log = os.path.join(tmp, "console.log")
    agent, qmp_path = os.path.join(tmp, "agent.sock"), os.path.join(tmp, "qmp.sock")
    img1, img2 = os.path.join(tmp, "d1.img"), os.path.join(tmp, "d2.img")
    for p in (img1, img2):
        with open(p, "wb") as f:
            f.truncate(16 << 20)
    cmd = qemu_base(args, tmp, log, "") + [
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-machine", "pc,memory-backend=mem",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", "socket,id=agent0,path=%s,server=on,wait=off" % agent,
        "-device", "virtserialport,bus=vser0.0,chardev=agent0,name=agent.channel.0",
        "-device", "virtio-rng-pci",
        "-device", "virtio-scsi-pci,id=scsi0",
        "-device", "pci-bridge,id=br1,chassis_nr=1,addr=0x1e",
        "-qmp", "unix:%s,server=on,wait=off" % qmp_path]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "qemu.err"), "w"))
    try:
        ready = wait_for(log, b"CAPSULE-TEST-INIT READY", proc, 120)
        dt = time.time() - t0
        up = re.search(rb"uptime: .*", open(log, "rb").read())
        check(ready, "boot to READY in %.1f s (%s)" % (dt, up.group(0).decode() if up else "?"))
        if not ready:
            return

        ch = Channel(agent)
        rc, out = ch.run("uname -r")
        check(rc == 0 and out.strip() == kver, "channel: uname -r = %s" % out.strip())
        rc, out = ch.run("for d in %s; do [ -d /sys/bus/$d ] || echo $d; done"
                         % " ".join(REQUIRED_DRIVERS))
        missing = out.split()
        rc, out = ch.run("cat /proc/filesystems")
        have = {line.split()[-1] for line in out.splitlines() if line.strip()}
        missing += ["fs:" + f for f in REQUIRED_FS if f not in have]
        check(not missing, "drivers and filesystems present (missing: %s)" % (missing or "none"))
        rc, out = ch.run("[ -e /dev/loop-control ] && [ -d /proc/sys/net/ipv6 ] && [ -e /proc/self/ns/cgroup ]")
        check(rc == 0, "loop, IPv6, cgroup namespaces present")
        rc, out = ch.run("false")
        check(rc == 1, "exit status is reported")
        rc, out = ch.run("echo to-stderr >&2")
        check(out == "to-stderr\n", "stderr goes to the channel")
        ch.close()
        time.sleep(0.5)
        ch = Channel(agent)
        rc, out = ch.run("echo again")
        check(out == "again\n", "reconnect after disconnect")

        q = Qmp(qmp_path)
        r1 = q.cmd("blockdev-add", **{"driver": "raw", "node-name": "n1",
                                      "file": {"driver": "file", "filename": img1}})
        r2 = q.cmd("device_add", driver="virtio-blk-pci", id="blk1", drive="n1",
                   serial="SMOKE-SER-1", bus="br1", addr="0x3")
        r3 = q.cmd("blockdev-add", **{"driver": "raw", "node-name": "n2",
                                      "file": {"driver": "file", "filename": img2}})
        r4 = q.cmd("device_add", **{"driver": "scsi-hd", "id": "sd1", "bus": "scsi0.0",
                                    "drive": "n2", "channel": 0, "scsi-id": 2, "lun": 0,
                                    "serial": "SMOKE-SER-2"})
        check(all("return" in r for r in (r1, r2, r3, r4)), "QMP hotplug accepted")
        rc, a = ch.run(". /etc/capsule/helpers.sh; find_serial_block SMOKE-SER-1")
        rc, b = ch.run("find_pci_block 1e/03")
        check(a.strip().startswith("/dev/vd") and a == b,
              "find_serial_block / find_pci_block 1e/03 -> %s / %s" % (a.strip(), b.strip()))
        rc, a = ch.run("find_scsi_block 2:0")
        rc, b = ch.run("find_serial_block SMOKE-SER-2")
        check(a.strip().startswith("/dev/sd") and a == b,
              "find_scsi_block 2:0 / find_serial_block -> %s / %s" % (a.strip(), b.strip()))
        rc, out = ch.run("find_serial_block NO-SUCH-SERIAL 0")
        check(rc == 1, "missing serial -> status 1")
        ch.close()
    finally:
        proc.kill()
        proc.wait()
        if args.keep or failures:
            print("logs in", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # report, do not hide
        check(False, "exception: %r" % (e,))
    print("smoke test: %s" % ("FAILED: " + "; ".join(failures) if failures else "all passed"))
    sys.exit(1 if failures else 0)
