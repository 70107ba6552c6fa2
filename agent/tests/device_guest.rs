//! Device discovery in a real guest, without the agent: boots the test guest
//! image (`guest/build.sh`) under QEMU/TCG (launched by capsule-hypervisor)
//! with this test binary (and the host's libc) appended to the initramfs,
//! hotplugs disks with raw QMP commands (exact buses and addresses, a
//! hot-added pci-bridge) and runs the guest half ([`guest_side`]) through
//! the test image's shell channel. The real hotplug stack (device manager +
//! hypervisor) is covered by `device_hotplug.rs`.
//!
//! Covered: virtio-blk on the root bus and behind a pci-bridge, scsi-hd on
//! virtio-scsi, vhost-user-blk (qemu-storage-daemon), nvdimm pmem; each
//! hotplugged while the guest waits, found by address, its node made in a
//! container root, host data read and guest data written back to the host
//! file; unplug -> no longer matched; re-plug at the same address -> the new
//! disk at the same container path; duplicate container paths refused.
//!
//! Fails (saying what to build or install) without root,
//! qemu-system-x86_64, qemu-storage-daemon or the guest images
//! (`target/guest/` or `$CAPSULE_GUEST_OUT`: `make guest`).
use capsule_agent::device;

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use capsule_agent_protocol::agent::{Device, DeviceKind};
use capsule_devmgr::BlockDriver;
use capsule_hypervisor::config::{AccelMode, MachineType, PmemConfig, VmConfig, VsockMode};
use capsule_hypervisor::testkit::Daemon;
use capsule_hypervisor::{QemuVm, VmBuilder};
use device::{create_nodes, prepare, DeviceWatcher};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const STEP_ENV: &str = "CAPSULE_DEVICE_GUEST_STEP";
const GUEST_EXE: &str = "/capsule-probe/device_guest";
const MARK_AT: u64 = 4096;

#[derive(Serialize, Deserialize, Debug, Clone)]
struct StepDevice {
    id: String,
    kind: i32,
    addr: String,
    path: String,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct Step {
    devices: Vec<StepDevice>,
    timeout_ms: u64,
    write: bool,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Got {
    id: String,
    node: String,
    major: u32,
    minor: u32,
    /// The first bytes of the device read through the container node.
    read: String,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct Outcome {
    got: Vec<Got>,
    error: Option<String>,
    timeout: bool,
}

// ---------------------------------------------------------------- guest half

fn marker(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[test]
#[ignore = "the guest half: guest_hotplug_discovery runs it inside the VM"]
fn guest_side() {
    let Ok(step) = std::env::var(STEP_ENV) else {
        eprintln!("{STEP_ENV} not set: nothing to do outside the guest");
        return;
    };
    let step: Step = serde_json::from_str(&step).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let out = rt.block_on(async {
        let w = DeviceWatcher::start("/sys".into(), "/dev".into()).unwrap();
        println!("WAITING");
        std::io::stdout().flush().unwrap();
        let devices: Vec<Device> = step
            .devices
            .iter()
            .map(|s| {
                let mut d = Device::new();
                d.id = s.id.clone();
                d.kind = capsule_agent_protocol::protobuf::EnumOrUnknown::from_i32(s.kind);
                d.guest_address = s.addr.clone();
                d.container_path = s.path.clone();
                d.file_mode = 0o660;
                d
            })
            .collect();
        match prepare(&w, &devices, Duration::from_millis(step.timeout_ms)).await {
            Err(e) => Outcome {
                got: vec![],
                error: Some(e.to_string()),
                timeout: e.is_timeout(),
            },
            Ok(prepared) => {
                // Not under /tmp: the test image mounts it nodev.
                let root = Path::new("/ctr");
                fs::create_dir_all(root.join("dev")).unwrap();
                create_nodes(root, &prepared).unwrap();
                let mut got = Vec::new();
                for p in &prepared {
                    let node = root.join(p.device.container_path.trim_start_matches('/'));
                    let meta = fs::symlink_metadata(&node).unwrap();
                    assert!(meta.file_type().is_block_device());
                    assert_eq!(
                        meta.rdev(),
                        nix::sys::stat::makedev(p.guest_major.into(), p.guest_minor.into())
                    );
                    let mut f = fs::OpenOptions::new()
                        .read(true)
                        .write(step.write)
                        .open(&node)
                        .unwrap();
                    let mut buf = [0u8; 32];
                    f.read_exact(&mut buf).unwrap();
                    if step.write {
                        f.seek(SeekFrom::Start(MARK_AT)).unwrap();
                        f.write_all(format!("GUEST-{}", p.device.id).as_bytes())
                            .unwrap();
                        f.sync_all().unwrap();
                    }
                    got.push(Got {
                        id: p.device.id.clone(),
                        node: p.guest_node.display().to_string(),
                        major: p.guest_major,
                        minor: p.guest_minor,
                        read: marker(&buf),
                    });
                }
                Outcome {
                    got,
                    error: None,
                    timeout: false,
                }
            }
        }
    });
    println!("RESULT {}", serde_json::to_string(&out).unwrap());
}

// ----------------------------------------------------------------- host half

struct Cpio(Vec<u8>, u32);
impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.1 += 1;
        let fields = [
            self.1,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.0.extend_from_slice(b"070701");
        for f in fields {
            self.0.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(0);
        self.pad();
        self.0.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
}

/// The test image plus a cpio with `exe` at [`GUEST_EXE`] and the shared
/// libraries it needs at their host paths.
fn build_initrd(base: &Path, exe: &Path, dir: &Path) -> PathBuf {
    let stripped = dir.join("device_guest");
    let ok = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(exe)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        fs::copy(exe, &stripped).unwrap();
    }
    let ldd = Command::new("ldd").arg(exe).output().unwrap();
    let libs: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(str::to_owned)
        })
        .collect();
    assert!(!libs.is_empty(), "ldd found no libraries");
    let mut cpio = Cpio(Vec::new(), 900_000);
    let mut dirs = std::collections::BTreeSet::new();
    let mut files = vec![(GUEST_EXE.to_owned(), fs::read(&stripped).unwrap())];
    for lib in libs {
        files.push((lib.clone(), fs::read(&lib).unwrap()));
    }
    for (path, _) in &files {
        for a in Path::new(path).ancestors().skip(1) {
            if a != Path::new("/") {
                dirs.insert(a.to_string_lossy().trim_start_matches('/').to_owned());
            }
        }
    }
    for d in &dirs {
        cpio.entry(d, 0o040755, &[]);
    }
    for (path, data) in &files {
        cpio.entry(path.trim_start_matches('/'), 0o100755, data);
    }
    cpio.entry("TRAILER!!!", 0, &[]);
    let mut img = fs::read(base).unwrap();
    while !img.len().is_multiple_of(4) {
        img.push(0);
    }
    img.extend_from_slice(&cpio.0);
    let out = dir.join("initramfs.img");
    fs::write(&out, img).unwrap();
    out
}

fn connect(path: &Path) -> UnixStream {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if start.elapsed() > Duration::from_secs(20) => {
                panic!("{}: {e}", path.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn new(path: &Path) -> Self {
        let w = connect(path);
        w.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
            events: Vec::new(),
        };
        q.line();
        q.cmd("qmp_capabilities", json!({})).unwrap();
        q
    }
    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP {l:?}: {e}"))
    }
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        writeln!(self.w, "{}", json!({"execute": name, "arguments": args})).unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            } else {
                return Err(format!("{name}: {v}"));
            }
        }
    }
    fn ok(&mut self, name: &str, args: Value) {
        if let Err(e) = self.cmd(name, args) {
            panic!("{e}");
        }
    }
    fn wait_deleted(&mut self, id: &str) {
        let is = |v: &Value| v["event"] == "DEVICE_DELETED" && v["data"]["device"] == id;
        while !self.events.iter().any(is) {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
    fn add_blk(&mut self, node: &str, file: &Path, device: Value) {
        self.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": node, "file": {"driver": "file", "filename": file}}),
        );
        self.ok("device_add", device);
    }
}

/// The test image's shell channel (see guest/README.md).
struct Channel {
    s: UnixStream,
    buf: String,
    seq: u32,
}

impl Channel {
    fn new(path: &Path) -> Self {
        let mut s = connect(path);
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.write_all(b"\n").unwrap();
        Channel {
            s,
            buf: String::new(),
            seq: 0,
        }
    }
    /// Reads until `needle` shows up (consuming through it); returns what came before.
    fn until(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(i) = self.buf.find(needle) {
                let before = self.buf[..i].to_owned();
                self.buf.drain(..i + needle.len());
                return before;
            }
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} after {timeout:?}; got {:?}",
                self.buf
            );
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => panic!("channel closed; got {:?}", self.buf),
                Ok(n) => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("channel: {e}"),
            }
        }
    }
    /// Starts `cmd`; returns the tag that [`finish`](Self::finish) waits for.
    fn start(&mut self, cmd: &str) -> String {
        self.seq += 1;
        let tag = format!("{}_{}", std::process::id(), self.seq);
        write!(
            self.s,
            "echo __BEGIN_{tag}__; {cmd}\necho __END_{tag}__ $?\n"
        )
        .unwrap();
        self.until(&format!("__BEGIN_{tag}__\n"), Duration::from_secs(120));
        tag
    }
    fn finish(&mut self, tag: &str, timeout: Duration) -> (i32, String) {
        let out = self.until(&format!("__END_{tag}__ "), timeout);
        let code = self.until("\n", Duration::from_secs(5));
        (code.trim().parse().unwrap_or(-1), out)
    }
    fn run(&mut self, cmd: &str) -> (i32, String) {
        let tag = self.start(cmd);
        self.finish(&tag, Duration::from_secs(60))
    }
}

fn step_cmd(step: &Step) -> String {
    let json = serde_json::to_string(step).unwrap();
    assert!(!json.contains('\''));
    format!("{STEP_ENV}='{json}' {GUEST_EXE} --ignored --exact guest_side --nocapture --test-threads=1 </dev/null 2>&1")
}

fn outcome(out: &str) -> Outcome {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT in {out}"));
    serde_json::from_str(line).unwrap()
}

/// Runs a guest step; `plug` runs once the guest is subscribed and waiting.
fn guest_step(ch: &mut Channel, step: &Step, plug: impl FnOnce()) -> Outcome {
    let tag = ch.start(&step_cmd(step));
    ch.until("WAITING\n", Duration::from_secs(60));
    plug();
    let (code, out) = ch.finish(&tag, Duration::from_secs(120));
    assert_eq!(code, 0, "guest step failed: {out}");
    outcome(&out)
}

fn sd(id: &str, kind: DeviceKind, addr: &str, path: &str) -> StepDevice {
    StepDevice {
        id: id.into(),
        kind: kind as i32,
        addr: addr.into(),
        path: path.into(),
    }
}

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(format!("CAPSULE-{name}").as_bytes(), 0)
        .unwrap();
    p
}

fn read_at(p: &Path, at: u64, len: usize) -> String {
    let mut buf = vec![0u8; len];
    fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut buf, at)
        .unwrap();
    marker(&buf)
}

fn guest_images() -> Option<(PathBuf, PathBuf)> {
    let out = std::env::var_os("CAPSULE_GUEST_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"));
    let (k, i) = (out.join("vmlinuz"), out.join("initramfs-test.img"));
    (k.exists() && i.exists()).then_some((k, i))
}

/// QEMU started by the hypervisor crate, with the runtime its reaper and
/// QMP tasks live on. Killed (and reaped) on drop.
struct Qemu {
    rt: tokio::runtime::Runtime,
    vm: QemuVm,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let p = self.vm.process();
        if !p.has_exited() {
            let _ = p.signal(libc::SIGKILL);
        }
        self.rt.block_on(p.wait_exit(Duration::from_secs(10)));
    }
}

/// A booted test guest with this binary in its initramfs.
struct Vm {
    _qemu: Qemu,
    qmp: Qmp,
    ch: Channel,
    console: PathBuf,
}

impl Vm {
    fn console(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }
}

/// Guest images, root and QEMU; fails saying what to build or install.
fn preflight() -> (PathBuf, PathBuf) {
    let Some(images) = guest_images() else {
        panic!(
            "no guest images (vmlinuz, initramfs-test.img) in target/guest or $CAPSULE_GUEST_OUT: \
             build them with `make guest` (guest/build.sh)"
        );
    };
    capsule_hypervisor::testkit::require_root("booting the guest with hot-plugged disks");
    capsule_hypervisor::testkit::require_qemu();
    images
}

/// Boots `machine` through the hypervisor crate (TCG, 2 vCPUs, 512M
/// shared memory, the virtio-scsi controller `scsi0`; on pc nvdimm slots;
/// on q35 one root port, `rp0` at `08`), takes over QMP and waits for the
/// shell channel.
fn boot(dir: &Path, (kernel, base): (PathBuf, PathBuf), machine: MachineType) -> Vm {
    let initrd = build_initrd(&base, &std::env::current_exe().unwrap(), dir);
    let mut cfg = VmConfig::new(dir.join("run"));
    cfg.qemu_binary = capsule_hypervisor::testkit::require_qemu();
    cfg.machine = machine;
    cfg.pcie_root_ports = 1;
    cfg.vcpus = 2;
    cfg.memory_mb = 512;
    cfg.shared_memory = true;
    cfg.kernel = Some(kernel);
    cfg.initrd = Some(initrd);
    cfg.cmdline = "console=ttyS0 panic=-1 quiet".into();
    cfg.accel = AccelMode::Tcg;
    cfg.agent.vsock = VsockMode::Off;
    cfg.block_driver = BlockDriver::VirtioScsi;
    if machine == MachineType::Pc {
        cfg.pmem = Some(PmemConfig {
            slots: 2,
            maxmem_mb: 2048,
        });
    }
    cfg.die_with_parent = true;
    let (qmp_sock, agent_sock, console) = (cfg.qmp_socket(), cfg.agent_socket(), cfg.console_log());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let vm = rt
        .block_on(async {
            let vm = VmBuilder::new(cfg)?.start().await?;
            // QEMU serves one QMP client: this test's own.
            vm.disconnect().await;
            Ok::<_, capsule_hypervisor::HypervisorError>(vm)
        })
        .unwrap_or_else(|e| panic!("starting the VM: {e}"));
    let qemu = Qemu { rt, vm };
    let qmp = Qmp::new(&qmp_sock);
    let ch = Channel::new(&agent_sock);
    let mut vm = Vm {
        _qemu: qemu,
        qmp,
        ch,
        console,
    };
    let (code, out) = vm.ch.run("test -x /capsule-probe/device_guest && uname -r");
    assert_eq!(code, 0, "{out}\nconsole:\n{}", vm.console());
    vm
}

#[test]
fn guest_hotplug_discovery() {
    let images = preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (a, b, c, d, v) = (
        image(dir, "A", 8 << 20),
        image(dir, "B", 8 << 20),
        image(dir, "C", 8 << 20),
        image(dir, "D", 8 << 20),
        image(dir, "V", 8 << 20),
    );
    let p = image(dir, "P", 128 << 20);
    let _storage = Daemon::vhost_user_blk(&v, &dir.join("vub.sock"), &dir.join("qsd.log"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let vm = boot(dir, images, MachineType::Pc);
    let console_log = vm.console.clone();
    let console = || fs::read_to_string(&console_log).unwrap_or_default();
    let Vm {
        mut qmp,
        mut ch,
        _qemu,
        ..
    } = vm;
    // A pci-bridge (the launcher adds none), hot-added before the guest
    // waits: disks behind it have two-hop paths (1e/03).
    qmp.ok(
        "device_add",
        json!({"driver": "pci-bridge", "id": "br1", "chassis_nr": 1, "bus": "pci.0", "addr": "0x1e"}),
    );
    let (code, out) = ch.run(
        "i=0; while ! [ -d /sys/bus/pci/devices/0000:00:1e.0/pci_bus ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; ls /sys/bus/pci/devices/0000:00:1e.0/pci_bus",
    );
    assert_eq!(
        code,
        0,
        "the guest never saw the bridge: {out}\n{}",
        console()
    );

    // 1. Everything hotplugged while the guest waits.
    let mut devices = vec![
        sd("devA", DeviceKind::DEVICE_KIND_BLK_PCI, "07", "/dev/xvdb"),
        sd(
            "devB",
            DeviceKind::DEVICE_KIND_BLK_PCI,
            "1e/03",
            "/dev/xvdc",
        ),
        sd("devC", DeviceKind::DEVICE_KIND_SCSI, "1:4", "/dev/xvdd"),
        sd("devP", DeviceKind::DEVICE_KIND_PMEM, "0", "/dev/pm"),
    ];
    devices.push(sd(
        "devV",
        DeviceKind::DEVICE_KIND_VHOST_USER_BLK,
        "06",
        "/dev/xvde",
    ));
    let step = Step {
        devices,
        timeout_ms: 60_000,
        write: true,
    };
    let res = guest_step(&mut ch, &step, || {
        qmp.add_blk("nA", &a, json!({"driver": "virtio-blk-pci", "id": "blkA", "drive": "nA", "bus": "pci.0", "addr": "0x7"}));
        qmp.add_blk("nB", &b, json!({"driver": "virtio-blk-pci", "id": "blkB", "drive": "nB", "bus": "br1", "addr": "0x3"}));
        qmp.add_blk(
            "nC",
            &c,
            json!({"driver": "scsi-hd", "id": "sdC", "drive": "nC", "bus": "scsi0.0", "channel": 0, "scsi-id": 1, "lun": 4}),
        );
        qmp.ok(
            "object-add",
            json!({"qom-type": "memory-backend-file", "id": "pm0", "mem-path": p, "size": 128u64 << 20, "share": true}),
        );
        qmp.ok(
            "device_add",
            json!({"driver": "nvdimm", "id": "nv0", "memdev": "pm0"}),
        );
        {
            qmp.ok(
                "chardev-add",
                json!({"id": "vu1", "backend": {"type": "socket", "data": {
                    "addr": {"type": "unix", "data": {"path": dir.join("vub.sock")}}, "server": false}}}),
            );
            qmp.ok(
                "device_add",
                json!({"driver": "vhost-user-blk-pci", "id": "vub1", "chardev": "vu1", "bus": "pci.0", "addr": "0x6", "num-queues": 1}),
            );
        }
    });
    eprintln!("guest found: {:?}", res.got);
    assert_eq!(res.error, None, "console:\n{}", console());
    let read: Vec<(String, String)> = res
        .got
        .iter()
        .map(|g| (g.id.clone(), g.read.clone()))
        .collect();
    let mut want = vec![
        ("devA".to_owned(), "CAPSULE-A".to_owned()),
        ("devB".into(), "CAPSULE-B".into()),
        ("devC".into(), "CAPSULE-C".into()),
        ("devP".into(), "CAPSULE-P".into()),
    ];
    want.push(("devV".into(), "CAPSULE-V".into()));
    assert_eq!(read, want, "{res:?}");
    for (img, id) in [(&a, "devA"), (&b, "devB"), (&c, "devC"), (&p, "devP")] {
        assert_eq!(
            read_at(img, MARK_AT, 32),
            format!("GUEST-{id}"),
            "{}",
            img.display()
        );
    }
    assert_eq!(read_at(&v, MARK_AT, 32), "GUEST-devV");
    let node_a = res.got[0].node.clone();

    // 2. Unplugged: no longer matched, however recently it was seen.
    qmp.ok("device_del", json!({"id": "blkA"}));
    qmp.wait_deleted("blkA");
    qmp.ok("blockdev-del", json!({"node-name": "nA"}));
    let gone = Step {
        devices: vec![sd(
            "devA",
            DeviceKind::DEVICE_KIND_BLK_PCI,
            "07",
            "/dev/xvdb",
        )],
        timeout_ms: 1500,
        write: false,
    };
    let res = guest_step(&mut ch, &gone, || {});
    assert!(res.timeout, "{res:?}");
    let msg = res.error.unwrap_or_default();
    assert!(
        msg.starts_with("device devA (blk-pci at 07): not visible in the guest after 1.5s"),
        "{msg}"
    );

    // 3. Another disk plugged at the same address: the same container path
    //    now reaches the new disk.
    let again = Step {
        devices: vec![sd(
            "devD",
            DeviceKind::DEVICE_KIND_BLK_PCI,
            "07",
            "/dev/xvdb",
        )],
        timeout_ms: 60_000,
        write: true,
    };
    let res = guest_step(&mut ch, &again, || {
        qmp.add_blk("nD", &d, json!({"driver": "virtio-blk-pci", "id": "blkD", "drive": "nD", "bus": "pci.0", "addr": "0x7"}));
    });
    assert_eq!(res.error, None);
    assert_eq!(
        res.got[0].read, "CAPSULE-D",
        "{res:?} (the old disk was {node_a})"
    );
    assert_eq!(read_at(&d, MARK_AT, 32), "GUEST-devD");
    assert_eq!(
        read_at(&a, MARK_AT, 32),
        "GUEST-devA",
        "the unplugged disk was written again"
    );

    // 4. Two devices for one container path.
    let dup = Step {
        devices: vec![
            sd(
                "devB",
                DeviceKind::DEVICE_KIND_BLK_PCI,
                "1e/03",
                "/dev/same",
            ),
            sd("devC", DeviceKind::DEVICE_KIND_SCSI, "1:4", "/dev/same"),
        ],
        timeout_ms: 5000,
        write: false,
    };
    let res = guest_step(&mut ch, &dup, || {});
    assert_eq!(
        res.error.as_deref(),
        Some("devices devB (blk-pci at 1e/03) and devC (scsi at 1:4) both want container path /dev/same")
    );
    let _ = qmp.cmd("quit", json!({}));
}

#[test]
fn guest_pcie_root_port_discovery() {
    let images = preflight();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = image(dir, "Q", 8 << 20);
    let mut vm = boot(dir, images, MachineType::Q35);
    let step = Step {
        devices: vec![sd(
            "devQ",
            DeviceKind::DEVICE_KIND_BLK_PCI,
            "08/00",
            "/dev/xvdq",
        )],
        timeout_ms: 60_000,
        write: true,
    };
    let qmp = &mut vm.qmp;
    let res = guest_step(&mut vm.ch, &step, || {
        qmp.add_blk("nQ", &img, json!({"driver": "virtio-blk-pci", "id": "blkQ", "drive": "nQ", "bus": "rp0", "addr": "0x0"}));
    });
    assert_eq!(res.error, None, "console:\n{}", vm.console());
    assert_eq!(res.got[0].read, "CAPSULE-Q");
    assert_eq!(read_at(&img, MARK_AT, 32), "GUEST-devQ");
    let _ = vm.qmp.cmd("quit", json!({}));
}
