#!/usr/bin/env python3
"""Boot-time and memory measurements of the capsule guest under bare QEMU.

    flock /tmp/capsule-vm.lock guest/kernel/measure-boot.py [--runs N] [--mem-runs N]
        [--sections kernels,firmware,cmdline,tbsize,balloon,prt] [--guest DIR] [--json FILE]
        [--other-qemu BIN:DATADIR --other-kernel VMLINUX]

Boots the test initramfs (guest/test-init.sh) with capsule's own QEMU command
line (hypervisor/src/launch/argv.rs for the shim's defaults: pc, TCG, 1 vCPU,
-m 256 on a shared memfd backend, virtio-serial agent port, virtio-scsi,
virtio-rng, console on a file, QMP socket) plus the variant's changes.

Boot time: wall time from spawning QEMU until the console shows
"CAPSULE-TEST-INIT READY" (ready) and until QEMU has exited (exit; the
kernel command line carries capsule.bench=ready-poweroff, so test-init
powers off at READY), and the guest's own uptime at /init and at READY.
Memory: QEMU's Rss/Pss (/proc/PID/smaps_rollup) 10 s after READY, the VM
left running.

Sections:
  kernels   Debian cloud kernel + modules, capsule bzImage, capsule vmlinux (PVH)
  firmware  SeaBIOS vs qboot (-bios /usr/share/qemu/qboot.rom), pc and q35
  cmdline   kernel command line variants
  tbsize    -accel tcg,tb-size=N: boot time and memory
  balloon   virtio-balloon with free page reporting: memory idle and after
            the guest filled and freed 100 MiB of tmpfs
  prt       ACPI _PRT cost per PCI device on pc: the installed QEMU and a
            second one (--other-qemu: a binary and its firmware directory,
            e.g. bookworm-backports' 10.0 unpacked with dpkg -x), the
            capsule kernel with and without guest/kernel/patches
            (--other-kernel), with 3 and 7 PCI devices (4 extra virtio-rng)

Runs are interleaved (run 1 of every variant, then run 2, ...) so drift in
the host's load spreads over all variants. Prints min/median/max tables.
"""
import argparse, json, os, re, shutil, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QBOOT = "/usr/share/qemu/qboot.rom"
BASE_APPEND = "console=ttyS0 panic=-1 quiet"


def qemu_argv(v, tmp, append):
    """capsule's command line (argv.rs, shim defaults) with variant v's changes."""
    machine = v.get("machine", "pc")
    root = "pci.0" if machine == "pc" else "pcie.0"
    mem = v.get("mem", 256)
    accel = "tcg" + (",tb-size=%d" % v["tb"] if v.get("tb") else "")
    a = [v.get("qemu", "qemu-system-x86_64")]
    if v.get("datadir"):
        a += ["-L", v["datadir"]]
    if v.get("shared", True):
        a += ["-machine", machine + ",memory-backend=mem"]
    else:
        a += ["-machine", machine]
    a += ["-accel", accel, "-smp", str(v.get("smp", 1)), "-m", "%dM" % mem]
    if v.get("shared", True):
        a += ["-object", "memory-backend-memfd,id=mem,size=%dM,share=on" % mem]
    if v.get("bios"):
        a += ["-bios", v["bios"]]
    a += ["-kernel", v["kernel"], "-initrd", v["initrd"], "-append", append,
          "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
          "-chardev", "file,id=console0,path=%s/console.log" % tmp, "-serial", "chardev:console0",
          "-chardev", "socket,id=qmp0,path=%s/qmp.sock,server=on,wait=off" % tmp,
          "-mon", "chardev=qmp0,mode=control",
          "-device", "virtio-serial-pci,id=vser0,bus=%s,addr=0x02" % root,
          "-chardev", "socket,id=agent0,path=%s/agent.sock,server=on,wait=off" % tmp,
          "-device", "virtserialport,bus=vser0.0,chardev=agent0,name=agent.channel.0",
          "-device", "virtio-scsi-pci,id=scsi0,bus=%s,addr=0x03" % root,
          "-object", "rng-builtin,id=rng0",
          "-device", "virtio-rng-pci,id=rng0dev,rng=rng0,bus=%s,addr=0x05" % root]
    for n in range(v.get("extra_rng", 0)):
        a += ["-object", "rng-builtin,id=xrng%d" % n,
              "-device", "virtio-rng-pci,id=xrng%ddev,rng=xrng%d,bus=%s,addr=%#04x" % (n, n, root, 0x10 + n)]
    if v.get("balloon"):
        a += ["-device", "virtio-balloon-pci,id=balloon0,bus=%s,addr=0x06%s"
              % (root, ",free-page-reporting=on" if v["balloon"] == "fpr" else "")]
    return a


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def uptimes(console):
    m = re.search(rb"uptime: init=([\d.]+)s ready=([\d.]+)s", console)
    return (float(m.group(1)), float(m.group(2))) if m else (None, None)


def boot_time(v):
    """One boot to READY and poweroff. Returns a dict or raises."""
    tmp = tempfile.mkdtemp(prefix="capsule-measure.")
    try:
        append = " ".join(x for x in (BASE_APPEND, v.get("append", ""), "capsule.bench=ready-poweroff") if x)
        log = os.path.join(tmp, "console.log")
        t0 = time.monotonic()
        p = subprocess.Popen(qemu_argv(v, tmp, append), stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(tmp, "qemu.err"), "w"))
        t_ready = None
        while True:
            rc = p.poll()
            if t_ready is None and b"CAPSULE-TEST-INIT READY" in read(log):
                t_ready = time.monotonic() - t0
            if rc is not None:
                break
            if time.monotonic() - t0 > 120:
                p.kill(); p.wait()
                raise RuntimeError("no poweroff within 120 s")
            time.sleep(0.005)
        t_exit = time.monotonic() - t0
        con = read(log)
        if t_ready is None and b"CAPSULE-TEST-INIT READY" in con:
            t_ready = t_exit
        if t_ready is None:
            raise RuntimeError("no READY (rc %s): %s %s" % (rc, con[-400:], read(os.path.join(tmp, "qemu.err"))[-400:]))
        init, ready = uptimes(con)
        return {"ready": t_ready, "exit": t_exit, "g_init": init, "g_ready": ready}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def channel_run(path, cmd, timeout=120):
    """Runs cmd through test-init's command channel (see guest/README.md)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(timeout)
    tag = "m%d" % os.getpid()
    s.sendall(("\necho __B_%s__; %s\necho __E_%s__ $?\n" % (tag, cmd, tag)).encode())
    buf = b""
    pat = re.compile(rb"__B_%s__\n(.*?)__E_%s__ (\d+)\n" % (tag.encode(), tag.encode()), re.S)
    while not pat.search(buf):
        d = s.recv(65536)
        if not d:
            break
        buf += d
    s.close()
    m = pat.search(buf)
    return (int(m.group(2)), m.group(1).decode(errors="replace")) if m else (None, buf.decode(errors="replace"))


def smaps(pid):
    r = {}
    for line in open("/proc/%d/smaps_rollup" % pid):
        f = line.split()
        if len(f) >= 2 and f[0].endswith(":") and f[1].isdigit():
            r[f[0][:-1]] = int(f[1])  # kB
    return r


def memory(v, settle=10.0, workload=None):
    """Boots, waits for READY, optionally runs a workload in the guest, waits
    `settle` seconds, reads QEMU's smaps_rollup; kills QEMU."""
    tmp = tempfile.mkdtemp(prefix="capsule-measure.")
    p = None
    try:
        append = " ".join(x for x in (BASE_APPEND, v.get("append", "")) if x)
        log = os.path.join(tmp, "console.log")
        t0 = time.monotonic()
        p = subprocess.Popen(qemu_argv(v, tmp, append), stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(tmp, "qemu.err"), "w"))
        while b"CAPSULE-TEST-INIT READY" not in read(log):
            if p.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError("no READY (qemu rc %s): console %r, stderr %r" % (
                    p.poll(), read(log)[-300:], read(os.path.join(tmp, "qemu.err"))[-300:]))
            time.sleep(0.01)
        t_ready = time.monotonic() - t0
        out = {"ready": t_ready}
        if workload:
            rc, text = channel_run(os.path.join(tmp, "agent.sock"), workload)
            if rc != 0:
                raise RuntimeError("workload failed (%s): %s" % (rc, text[-300:]))
            out["before"] = smaps(p.pid)
        time.sleep(settle)
        m = smaps(p.pid)
        out.update({k: m.get(k) for k in ("Rss", "Pss", "Pss_Anon", "Pss_Shmem", "Pss_File")})
        return out
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return "%.2f / %.2f / %.2f" % (min(xs), statistics.median(xs), max(xs))


def mstats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    xs = [x / 1024 for x in xs]  # MiB
    return "%.0f / %.0f / %.0f" % (min(xs), statistics.median(xs), max(xs))


def run_boot_section(title, variants, runs, results):
    print("\n### %s (s, min / median / max of %d runs)\n" % (title, runs), flush=True)
    data = {v["name"]: [] for v in variants}
    errors = {v["name"]: [] for v in variants}
    for _ in range(runs):
        for v in variants:
            try:
                data[v["name"]].append(boot_time(v))
            except Exception as e:  # report, do not hide
                errors[v["name"]].append(str(e)[:300])
    print("| variant | QEMU start -> READY | -> QEMU exit | guest uptime at /init | at READY | failed |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        d = data[v["name"]]
        print("| %s | %s | %s | %s | %s | %s |" % (
            v["name"], stats([x["ready"] for x in d]), stats([x["exit"] for x in d]),
            stats([x["g_init"] for x in d]), stats([x["g_ready"] for x in d]),
            "%d: %s" % (len(errors[v["name"]]), errors[v["name"]][0]) if errors[v["name"]] else "0"),
            flush=True)
    results[title] = {"data": data, "errors": errors}


def run_mem_section(title, variants, runs, results, workload=None):
    print("\n### %s (MiB, min / median / max of %d runs)\n" % (title, runs), flush=True)
    data = {v["name"]: [] for v in variants}
    errors = {v["name"]: [] for v in variants}
    for _ in range(runs):
        for v in variants:
            try:
                data[v["name"]].append(memory(v, workload=v.get("workload", workload)))
            except Exception as e:
                errors[v["name"]].append(str(e)[:300])
    print("| variant | READY (s) | Rss | Pss | Pss_Anon | Pss_Shmem | failed |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        d = data[v["name"]]
        print("| %s | %s | %s | %s | %s | %s | %s |" % (
            v["name"], stats([x["ready"] for x in d]),
            mstats([x["Rss"] for x in d]), mstats([x["Pss"] for x in d]),
            mstats([x["Pss_Anon"] for x in d]), mstats([x["Pss_Shmem"] for x in d]),
            "%d: %s" % (len(errors[v["name"]]), errors[v["name"]][0]) if errors[v["name"]] else "0"),
            flush=True)
    results[title] = {"data": data, "errors": errors}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", default=os.path.join(ROOT, "target/guest"),
                    help="capsule images (vmlinux, vmlinuz, initramfs-test.img); the Debian ones in DIR/debian")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mem-runs", type=int, default=3)
    ap.add_argument("--sections", default="kernels,firmware,cmdline,tbsize,balloon")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--other-qemu", help="prt section: BIN:DATADIR of a second QEMU")
    ap.add_argument("--other-kernel", help="prt section: a vmlinux built without guest/kernel/patches")
    args = ap.parse_args()
    g = args.guest
    cap_i = os.path.join(g, "initramfs-test.img")
    cap_bz = dict(kernel=os.path.join(g, "vmlinuz"), initrd=cap_i)
    cap_pvh = dict(kernel=os.path.join(g, "vmlinux"), initrd=cap_i)
    deb = dict(kernel=os.path.join(g, "debian/vmlinuz"), initrd=os.path.join(g, "debian/initramfs-test.img"))
    for f in (cap_i, cap_bz["kernel"], cap_pvh["kernel"], deb["kernel"], deb["initrd"]):
        if not os.path.exists(f):
            sys.exit("missing %s: run guest/build.sh" % f)
    sections = args.sections.split(",")
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print("# capsule guest boot measurements\n\n%s; host %s, %d CPUs, load %s; %s"
          % (qemu, os.uname().release, os.cpu_count(), open("/proc/loadavg").read().split()[0],
             time.strftime("%Y-%m-%d %H:%M")), flush=True)
    print("kernels: capsule %s, debian %s" % (
        read(os.path.join(g, "kernel-version")).decode().strip(),
        read(os.path.join(g, "debian/kernel-version")).decode().strip()))
    print("base command line: `%s` (+ capsule.bench=ready-poweroff for boot times)" % BASE_APPEND)
    results = {}

    if "kernels" in sections:
        run_boot_section("a. kernels (pc, SeaBIOS)", [
            dict(name="Debian cloud bzImage + 24 modules", **deb),
            dict(name="capsule bzImage", **cap_bz),
            dict(name="capsule vmlinux (PVH)", **cap_pvh),
        ], args.runs, results)

    if "firmware" in sections:
        vs = []
        for machine in ("pc", "q35"):
            for bios, bname in ((None, "SeaBIOS"), (QBOOT, "qboot")):
                for k, kname in ((cap_bz, "bzImage"), (cap_pvh, "vmlinux PVH")):
                    vs.append(dict(name="%s, %s, capsule %s" % (machine, bname, kname),
                                   machine=machine, bios=bios, **k))
            vs.append(dict(name="%s, qboot, Debian bzImage" % machine, machine=machine, bios=QBOOT, **deb))
        run_boot_section("b. firmware", vs, args.runs, results)

    if "cmdline" in sections:
        opts = ["", "loglevel=0", "tsc=reliable", "no_timer_check", "noreplace-smp",
                "pci=lastbus=0", "i8042.noaux", "cryptomgr.notests", "random.trust_cpu=on",
                "tsc=reliable no_timer_check noreplace-smp cryptomgr.notests"]
        vs = [dict(name="capsule PVH, quiet" + (" " + o if o else ""), append=o, **cap_pvh) for o in opts]
        vs.append(dict(name="capsule PVH, no quiet (loglevel 7)", append="loglevel=7", **cap_pvh))
        vs += [dict(name="Debian, quiet" + (" " + o if o else ""), append=o, **deb)
               for o in ("", "loglevel=0", "i8042.noaux", "i8042.nopnp i8042.noaux i8042.nokbd 8250.nr_uarts=1")]
        run_boot_section("c. kernel command line", vs, args.runs, results)

    if "tbsize" in sections:
        vs = [dict(name="tb-size " + (str(t) + " MiB" if t else "default"), tb=t, **cap_pvh)
              for t in (None, 256, 64, 32, 16)]
        run_boot_section("d1. TCG translation cache: boot time (capsule PVH)", vs, args.runs, results)
        run_mem_section("d2. TCG translation cache: QEMU memory 10 s after READY (capsule PVH)", vs,
                        args.mem_runs, results)

    if "balloon" in sections:
        fill = "head -c 100m /dev/zero >/tmp/fill && sync && rm /tmp/fill && echo 3 >/proc/sys/vm/drop_caches"
        vs = []
        for shared, sname in ((True, "memfd share=on"), (False, "anonymous RAM")):
            for b, bname in ((None, "no balloon"), ("plain", "balloon"), ("fpr", "balloon free-page-reporting=on")):
                vs.append(dict(name="%s, %s" % (sname, bname), shared=shared, balloon=b, **cap_pvh))
        run_mem_section("e1. guest memory: idle, 10 s after READY (capsule PVH)", vs, args.mem_runs, results)
        vs2 = [dict(v, name=v["name"] + ", after 100 MiB fill+free") for v in vs]
        run_mem_section("e2. guest memory: 10 s after the guest wrote and freed 100 MiB of tmpfs (capsule PVH)",
                        vs2, args.mem_runs, results, workload=fill)

    if "prt" in sections:
        if not args.other_qemu or ":" not in args.other_qemu or not args.other_kernel:
            sys.exit("the prt section needs --other-qemu BIN:DATADIR and --other-kernel VMLINUX")
        obin, odata = args.other_qemu.split(":", 1)
        short = lambda v: v.replace("QEMU emulator version ", "").split(" ")[0]
        oname = short(subprocess.run([obin, "--version"], capture_output=True, text=True).stdout)
        vs = []
        for extra in (0, 4):
            for qname, qv in ((short(qemu), {}), (oname, dict(qemu=obin, datadir=odata))):
                for kname, kernel in (("patched kernel", cap_pvh["kernel"]), ("unpatched kernel", args.other_kernel)):
                    vs.append(dict(name="QEMU %s, %s, %d PCI devices" % (qname, kname, 3 + extra),
                                   extra_rng=extra, kernel=kernel, initrd=cap_i, **qv))
        run_boot_section("f. ACPI _PRT per PCI device: QEMU version and kernel patch (pc, SeaBIOS, PVH)",
                         vs, args.runs, results)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
