//! Hostile container specs fed straight to the device manager: OCI
//! `linux.devices` through `oci::spec_devices`, the `Resolver` over fixture
//! sysfs / dev / vhost-user store trees (real nodes: needs root for mknod),
//! and a `DeviceManager` on a `FileStore` with a `RecordingBackend`.
//!
//! Devices are admitted the way the shim admits a container's devices: in
//! order, resolve + new reference + attach, and on any error the ones
//! admitted before are detached and dropped again. Every hostile spec puts
//! good devices before the bad one, so the rollback is exercised. Each
//! refusal must name the device and the reason, and leave the manager
//! exactly as it was: with nothing attached and no allocator holding
//! anything (from an empty sandbox), or equal to the previous containers'
//! devices (from a sandbox that already runs some, sharing one of them).
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use capsule_devmgr::device::{BlockDriver, DeviceInfo, DeviceKind};
use capsule_devmgr::manager::{DeviceId, DeviceManager, ManagerConfig};
use capsule_devmgr::state::{decode, FileStore, SandboxState, StateStore, STATE_FILE};
use capsule_devmgr::testing::ManagerTestExt;
use capsule_devmgr::testing::{check_consistency, BackendOp, RecordingBackend};
use capsule_devmgr::{oci, NullStore, Resolver, ResolverConfig};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{Linux, LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType, Spec};

/// A temp dir on tmpfs when there is one (thousands of nodes and state
/// writes; nothing here needs a disk).
fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// `/sys`, `/dev` and a vhost-user store in a tempdir.
struct Host {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    sys: PathBuf,
    dev: PathBuf,
    store: PathBuf,
    _sockets: Vec<UnixListener>,
}

const GPU: (u16, u16, u32, usize) = (0x10de, 0x20b0, 0x030200, 4096);
const AUDIO: (u16, u16, u32, usize) = (0x10de, 0x1aef, 0x040300, 256);
const SMALL_BAR: &str = "0x00000000fa000000 0x00000000faffffff 0x0000000000040200\n";

/// Malformed entries of IOMMU groups 13, 14, ...
const BAD_BDFS: [&str; 6] = [
    "0000:zz:00.0",
    "garbage",
    "0000:00:1f",
    "0000:00:00.8",
    "0000:100:00.0",
    "0000:00:20.0",
];

impl Host {
    fn new(loops: u32) -> Self {
        let tmp = tempdir();
        let root = fs::canonicalize(tmp.path()).unwrap();
        let (sys, dev, store) = (root.join("sys"), root.join("dev"), root.join("store"));
        for d in [
            &sys,
            &dev,
            &store.join("block/devices"),
            &store.join("block/sockets"),
        ] {
            fs::create_dir_all(d).unwrap();
        }
        let mut h = Self {
            _tmp: tmp,
            root,
            sys,
            dev,
            store,
            _sockets: Vec::new(),
        };
        // Loop devices b 7:N at /dev/loopN; the first four also in sysfs.
        for n in 0..loops {
            h.node(&format!("loop{n}"), SFlag::S_IFBLK, 7, n);
            if n < 4 {
                h.sysfs_dev(
                    "block",
                    7,
                    n,
                    &format!("MAJOR=7\nMINOR={n}\nDEVNAME=loop{n}\n"),
                );
            }
        }
        // VFIO group 12: a GPU and its audio function.
        h.vfio_group(12);
        h.pci("12", "0000:3b:00.0", GPU);
        h.pci("12", "0000:3b:00.1", AUDIO);
        // Groups 13.. each hold a good function and one malformed entry.
        for (i, bad) in BAD_BDFS.iter().enumerate() {
            let group = 13 + i as u32;
            h.vfio_group(group);
            let good = h.pci(&group.to_string(), &format!("0000:4{i}:00.0"), GPU);
            h.group_link(&group.to_string(), bad, &good);
        }
        // Group 30: a function whose vendor attribute is not hex.
        h.vfio_group(30);
        let broken = h.pci("30", "0000:50:00.0", GPU);
        fs::write(broken.join("vendor"), "0xzz\n").unwrap();
        // A node with a bad VFIO name, no sysfs entry.
        h.node("vfio/12abc", SFlag::S_IFCHR, 243, 99);
        // A sysfs entry whose DEVNAME leaves /dev/vfio.
        h.sysfs_dev(
            "char",
            243,
            40,
            "MAJOR=243\nMINOR=40\nDEVNAME=vfio/../../x\n",
        );
        h.node("x", SFlag::S_IFCHR, 243, 40);
        // A block node under /dev/vfio.
        h.node("vfio/7", SFlag::S_IFBLK, 7, 77);
        // Intel QAT: c 241:0, an ordinary char device.
        h.sysfs_dev("char", 241, 0, "MAJOR=241\nMINOR=0\nDEVNAME=qat_adf_ctl\n");
        h.node("qat_adf_ctl", SFlag::S_IFCHR, 241, 0);
        // The vhost-user store: one good entry...
        h.store_entry("vhost-blk0", 241, 0);
        // ...a device entry that is a symlink out of the store...
        let outside = h.root.join("outside/blk5");
        Self::node_at(&outside, SFlag::S_IFBLK, 241, 5);
        symlink(&outside, h.store.join("block/devices/escape")).unwrap();
        let sock = h.store.join("block/sockets/escape");
        h.socket_at(&sock);
        // ...a socket replaced by a regular file...
        Self::node_at(
            &h.store.join("block/devices/regular"),
            SFlag::S_IFBLK,
            241,
            7,
        );
        fs::write(h.store.join("block/sockets/regular"), b"").unwrap();
        // ...a socket that is missing, and a socket that is a symlink out.
        Self::node_at(
            &h.store.join("block/devices/nosock"),
            SFlag::S_IFBLK,
            242,
            8,
        );
        Self::node_at(
            &h.store.join("block/devices/linked"),
            SFlag::S_IFBLK,
            241,
            6,
        );
        let outside_sock = h.root.join("outside/sock");
        h.socket_at(&outside_sock);
        symlink(&outside_sock, h.store.join("block/sockets/linked")).unwrap();
        // b 241:9 exists as an ordinary node but not in the store.
        h.node("vdx", SFlag::S_IFBLK, 241, 9);
        // A symlinked node.
        symlink(h.dev.join("loop5"), h.dev.join("sneaky")).unwrap();
        // A fifo and a regular file.
        nix::unistd::mkfifo(&h.dev.join("fifo0"), Mode::from_bits_truncate(0o600)).unwrap();
        fs::write(h.dev.join("plain"), b"").unwrap();
        h
    }

    fn resolver(&self) -> Resolver {
        Resolver::new(ResolverConfig {
            sysfs_root: self.sys.clone(),
            dev_root: self.dev.clone(),
            vhost_user_store: Some(self.store.clone()),
            ..ResolverConfig::default()
        })
        .unwrap()
    }

    fn node_at(path: &Path, kind: SFlag, major: u32, minor: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        mknod(
            path,
            kind,
            Mode::from_bits_truncate(0o600),
            makedev(major.into(), minor.into()),
        )
        .unwrap();
    }

    fn node(&self, rel: &str, kind: SFlag, major: u32, minor: u32) {
        Self::node_at(&self.dev.join(rel), kind, major, minor);
    }

    fn sysfs_dev(&self, kind: &str, major: u32, minor: u32, uevent: &str) {
        let target = self
            .sys
            .join(format!("devices/virtual/{kind}-{major}-{minor}"));
        fs::create_dir_all(&target).unwrap();
        fs::write(target.join("uevent"), uevent).unwrap();
        let link = self.sys.join(format!("dev/{kind}/{major}:{minor}"));
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        symlink(&target, &link).unwrap();
    }

    fn vfio_group(&self, group: u32) {
        self.node(&format!("vfio/{group}"), SFlag::S_IFCHR, 243, group);
        self.sysfs_dev(
            "char",
            243,
            group,
            &format!("MAJOR=243\nMINOR={group}\nDEVNAME=vfio/{group}\n"),
        );
    }

    fn pci(
        &self,
        group: &str,
        bdf: &str,
        (vendor, device, class, config): (u16, u16, u32, usize),
    ) -> PathBuf {
        let dir = self.sys.join("devices/pci0000:00").join(bdf);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vendor"), format!("0x{vendor:04x}\n")).unwrap();
        fs::write(dir.join("device"), format!("0x{device:04x}\n")).unwrap();
        fs::write(dir.join("class"), format!("0x{class:06x}\n")).unwrap();
        fs::write(dir.join("config"), vec![0u8; config]).unwrap();
        fs::write(dir.join("resource"), SMALL_BAR).unwrap();
        self.group_link(group, bdf, &dir);
        dir
    }

    fn group_link(&self, group: &str, name: &str, target: &Path) {
        let link = self
            .sys
            .join("kernel/iommu_groups")
            .join(group)
            .join("devices")
            .join(name);
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        symlink(target, link).unwrap();
    }

    fn socket_at(&mut self, path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        self._sockets.push(UnixListener::bind(path).unwrap());
    }

    fn store_entry(&mut self, name: &str, major: u32, minor: u32) {
        Self::node_at(
            &self.store.join("block/devices").join(name),
            SFlag::S_IFBLK,
            major,
            minor,
        );
        let sock = self.store.join("block/sockets").join(name);
        self.socket_at(&sock);
    }
}

/// An OCI device entry; `path` may be any bytes.
fn dev(path: &[u8], typ: LinuxDeviceType, major: i64, minor: i64) -> LinuxDevice {
    let mut d = LinuxDevice::default();
    d.set_path(PathBuf::from(OsStr::from_bytes(path)))
        .set_typ(typ)
        .set_major(major)
        .set_minor(minor)
        .set_file_mode(Some(0o660))
        .set_uid(Some(0))
        .set_gid(Some(0));
    d
}

fn spec(devices: Vec<LinuxDevice>, rules: Vec<LinuxDeviceCgroup>) -> Spec {
    let mut linux = Linux::default();
    linux.set_devices(Some(devices));
    if let Some(r) = linux.resources_mut() {
        r.set_devices(Some(rules));
    }
    let mut s = Spec::default();
    s.set_linux(Some(linux));
    s
}

/// Good devices every hostile spec starts with: a loop disk and a GPU.
fn good_prefix() -> Vec<LinuxDevice> {
    vec![
        dev(b"/dev/xvda", LinuxDeviceType::B, 7, 0),
        dev(b"/dev/vfio/12", LinuxDeviceType::C, 243, 12),
    ]
}

/// What a container got: (device, its request).
type Admitted = Vec<(DeviceId, DeviceInfo)>;

/// Admits every device of `spec`, all or nothing (what the shim does).
async fn admit(mgr: &DeviceManager, resolver: &Resolver, spec: &Spec) -> Result<Admitted, String> {
    let infos = oci::spec_devices(spec).map_err(|e| e.to_string())?;
    let mut done: Admitted = Vec::new();
    for info in infos {
        let one = async {
            let host = resolver.resolve(&info).map_err(|e| e.to_string())?;
            let id = mgr.add(host).map_err(|e| e.to_string())?;
            if let Err(e) = mgr.attach(&id).await {
                mgr.remove_request(&id, Some(&info))
                    .await
                    .unwrap_or_else(|r| panic!("dropping the reference after {e}: {r}"));
                return Err(e.to_string());
            }
            Ok((id, info.clone()))
        };
        match one.await {
            Ok(d) => done.push(d),
            Err(e) => {
                release(mgr, &done).await;
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Detaches and drops what `admit` gave, newest first.
async fn release(mgr: &DeviceManager, done: &Admitted) {
    for (id, info) in done.iter().rev() {
        mgr.detach(id)
            .await
            .unwrap_or_else(|e| panic!("detach {id}: {e}"));
        mgr.remove_request(id, Some(info))
            .await
            .unwrap_or_else(|e| panic!("remove {id}: {e}"));
    }
}

fn config(driver: BlockDriver) -> ManagerConfig {
    ManagerConfig::new(driver, 1..32)
}

/// A sandbox on a `FileStore`; `busy` already runs a container using loop
/// disk 7:0 (shared with the hostile specs) and 7:3.
struct Sandbox {
    dir: tempfile::TempDir,
    mgr: DeviceManager,
    backend: Arc<RecordingBackend>,
}

impl Sandbox {
    async fn new(host: &Host, busy: bool) -> Self {
        let dir = tempdir();
        let backend = Arc::new(RecordingBackend::new());
        let mgr = DeviceManager::new(
            config(BlockDriver::VirtioScsi),
            backend.clone(),
            FileStore::open(dir.path()).unwrap(),
        )
        .unwrap();
        if busy {
            let other = spec(
                vec![
                    dev(b"/dev/shared", LinuxDeviceType::B, 7, 0),
                    dev(b"/dev/own", LinuxDeviceType::B, 7, 3),
                ],
                vec![],
            );
            admit(&mgr, &host.resolver(), &other).await.unwrap();
        }
        backend.clear_calls();
        Self { dir, mgr, backend }
    }

    fn file_state(&self) -> SandboxState {
        let bytes = fs::read(self.dir.path().join(STATE_FILE)).unwrap();
        decode(&bytes, self.mgr.config()).unwrap()
    }
}

/// A spec that must be refused, with what the error must contain.
struct Case {
    name: &'static str,
    spec: Spec,
    /// Substrings of the error: the device's name and the reason.
    want: Vec<String>,
    /// Hostile only next to the busy sandbox's container.
    only_busy: bool,
}

fn case(name: &'static str, devices: Vec<LinuxDevice>, want: &[&str]) -> Case {
    case_with_rules(name, devices, vec![], want)
}

fn case_with_rules(
    name: &'static str,
    devices: Vec<LinuxDevice>,
    rules: Vec<LinuxDeviceCgroup>,
    want: &[&str],
) -> Case {
    Case {
        name,
        spec: spec(devices, rules),
        want: want.iter().map(|s| s.to_string()).collect(),
        only_busy: false,
    }
}

/// The good prefix, `bad`, then another good device.
fn after_good(bad: LinuxDevice) -> Vec<LinuxDevice> {
    let mut v = good_prefix();
    v.push(bad);
    v.push(dev(b"/dev/xvdc", LinuxDeviceType::B, 7, 1));
    v
}

fn hostile_cases(host: &Host) -> Vec<Case> {
    use LinuxDeviceType::{A, B, C, P};
    let mut cases = vec![
        // Duplicate container paths (same or other device).
        case(
            "duplicate container path",
            vec![
                dev(b"/dev/xvda", B, 7, 0),
                dev(b"/dev/vfio/12", C, 243, 12),
                dev(b"/dev/xvda", B, 7, 1),
            ],
            &[
                "duplicate container path /dev/xvda",
                "linux.devices[0] /dev/xvda (b 7:0)",
                "linux.devices[2] /dev/xvda (b 7:1)",
            ],
        ),
        case(
            "duplicate container path, same device",
            after_good(dev(b"/dev/vfio/12", C, 243, 12)),
            &[
                "duplicate container path /dev/vfio/12",
                "linux.devices[1]",
                "linux.devices[2]",
            ],
        ),
        // Paths that are not absolute and normalised.
        case(
            "'..' in the path",
            after_good(dev(b"/dev/../etc/passwd", B, 7, 2)),
            &["/dev/../etc/passwd (b 7:2)", "'..' component"],
        ),
        case(
            "VFIO '..' path",
            after_good(dev(b"/dev/vfio/../x", C, 243, 40)),
            &["/dev/vfio/../x (c 243:40)", "'..' component"],
        ),
        case(
            "trailing '..'",
            after_good(dev(b"/dev/..", B, 7, 2)),
            &["/dev/.. (b 7:2)", "'..' component"],
        ),
        case(
            "'.' in the path",
            after_good(dev(b"/dev/./xvdb", B, 7, 2)),
            &["/dev/./xvdb (b 7:2)", "'.' component"],
        ),
        case(
            "relative path",
            after_good(dev(b"dev/xvdb", B, 7, 2)),
            &["dev/xvdb (b 7:2)", "not absolute"],
        ),
        case(
            "bare name",
            after_good(dev(b"xvdb", B, 7, 2)),
            &["xvdb (b 7:2)", "not absolute"],
        ),
        case(
            "empty path",
            after_good(dev(b"", B, 7, 2)),
            &["linux.devices[2] (b 7:2)", "container path is empty"],
        ),
        case(
            "double slash",
            after_good(dev(b"//dev/xvdb", B, 7, 2)),
            &["//dev/xvdb (b 7:2)", "'//'"],
        ),
        case(
            "trailing slash",
            after_good(dev(b"/dev/xvdb/", B, 7, 2)),
            &["/dev/xvdb/ (b 7:2)", "trailing '/'"],
        ),
        case(
            "root path",
            after_good(dev(b"/", B, 7, 2)),
            &["/ (b 7:2)", "root directory"],
        ),
        case(
            "NUL in the path",
            after_good(dev(b"/dev/xv\0db", B, 7, 2)),
            &["(b 7:2)", "NUL"],
        ),
        // Numbers out of range.
        case(
            "major i64::MAX",
            after_good(dev(b"/dev/xvdb", B, i64::MAX, 0)),
            &[
                &format!("/dev/xvdb (b {}:0)", i64::MAX),
                &format!("major {} is outside 0..=4095", i64::MAX),
            ],
        ),
        case(
            "major i64::MIN",
            after_good(dev(b"/dev/xvdb", C, i64::MIN, 0)),
            &["/dev/xvdb (c", "is outside 0..=4095"],
        ),
        case(
            "major -1",
            after_good(dev(b"/dev/xvdb", B, -1, 0)),
            &["/dev/xvdb (b -1:0)", "major -1 is outside"],
        ),
        case(
            "major 4096",
            after_good(dev(b"/dev/xvdb", B, 4096, 0)),
            &["/dev/xvdb (b 4096:0)", "major 4096 is outside 0..=4095"],
        ),
        case(
            "minor 1<<20",
            after_good(dev(b"/dev/xvdb", B, 7, 1 << 20)),
            &[
                "/dev/xvdb (b 7:1048576)",
                "minor 1048576 is outside 0..=1048575",
            ],
        ),
        case(
            "minor -1",
            after_good(dev(b"/dev/xvdb", C, 7, -1)),
            &["/dev/xvdb (c 7:-1)", "minor -1 is outside"],
        ),
        case(
            "minor i64::MAX",
            after_good(dev(b"/dev/xvdb", B, 7, i64::MAX)),
            &["/dev/xvdb (b 7:", "is outside 0..=1048575"],
        ),
        case(
            "fifo with numbers",
            after_good(dev(b"/dev/fifo0", P, 7, 1)),
            &["/dev/fifo0 (p 7:1)", "a fifo has no device number"],
        ),
        case(
            "type a",
            after_good(dev(b"/dev/xvdb", A, 7, 2)),
            &["/dev/xvdb (a 7:2)", "only valid in cgroup rules"],
        ),
        case(
            "file mode with type bits",
            after_good({
                let mut d = dev(b"/dev/xvdb", B, 7, 2);
                d.set_file_mode(Some(0o60660));
                d
            }),
            &["/dev/xvdb (b 7:2)", "fileMode 0o60660 has bits outside"],
        ),
        case_with_rules(
            "cgroup access with x",
            after_good(dev(b"/dev/xvdb", B, 7, 2)),
            vec![{
                let mut r = LinuxDeviceCgroup::default();
                r.set_allow(true)
                    .set_typ(Some(B))
                    .set_major(Some(7))
                    .set_minor(Some(2))
                    .set_access(Some("rwx".into()));
                r
            }],
            &["/dev/xvdb (b 7:2)", "access \"rwx\" has 'x'"],
        ),
        // Host resolution: the good devices are attached by then.
        case(
            "not on the host",
            after_good(dev(b"/dev/xvdb", B, 7, 999)),
            &["/dev/xvdb (b 7:999)", "does not exist"],
        ),
        case(
            "wrong node type",
            after_good(dev(b"/dev/loop1", C, 7, 1)),
            &["/dev/loop1 (c 7:1)", "it is a block device"],
        ),
        case(
            "symlinked node",
            after_good(dev(b"/dev/sneaky", B, 7, 5)),
            &["/dev/sneaky (b 7:5)", "it is a symlink"],
        ),
        case(
            "fifo that is a file",
            after_good(dev(b"/dev/plain", P, 0, 0)),
            &["/dev/plain (p 0:0)", "regular file, not a fifo"],
        ),
        case(
            "store entry symlinked out of the store",
            after_good(dev(b"/dev/vdb", B, 241, 5)),
            &[
                "/dev/vdb (b 241:5)",
                &host.store.display().to_string(),
                "no block node 241:5",
            ],
        ),
        case(
            "socket replaced by a regular file",
            after_good(dev(b"/dev/vdb", B, 241, 7)),
            &[
                "/dev/vdb (b 241:7)",
                "block/sockets/regular: is a regular file, not a unix socket",
            ],
        ),
        case(
            "socket missing",
            after_good(dev(b"/dev/sdb", B, 242, 8)),
            &[
                "/dev/sdb (b 242:8)",
                "block/sockets/nosock: socket is missing",
            ],
        ),
        case(
            "socket symlinked out of the store",
            after_good(dev(b"/dev/vdb", B, 241, 6)),
            &[
                "/dev/vdb (b 241:6)",
                "block/sockets/linked: is a symlink, not a unix socket",
            ],
        ),
        case(
            "b 241 outside the store",
            after_good(dev(b"/dev/vdx", B, 241, 9)),
            &[
                "/dev/vdx (b 241:9)",
                "not resolved as ordinary block devices",
            ],
        ),
        case(
            "VFIO group named 12abc",
            after_good(dev(b"/dev/vfio/12abc", C, 243, 99)),
            &[
                "/dev/vfio/12abc (c 243:99)",
                "vfio/12abc is neither a group",
            ],
        ),
        case(
            "DEVNAME leaving /dev/vfio",
            after_good(dev(b"/dev/vfio/40", C, 243, 40)),
            &["/dev/vfio/40 (c 243:40)", "DEVNAME \"vfio/../../x\""],
        ),
        case(
            "block node under /dev/vfio",
            after_good(dev(b"/dev/vfio/7", B, 7, 77)),
            &["/dev/vfio/7 (b 7:77)", "block device cannot be a VFIO node"],
        ),
        case(
            "VFIO function with a broken attribute",
            after_good(dev(b"/dev/vfio/30", C, 243, 30)),
            &[
                "/dev/vfio/30 (c 243:30)",
                "VFIO group 30",
                "vendor: \"0xzz\" is not a hex number",
            ],
        ),
        // A non-UTF-8 container path cannot be saved nor sent to the agent
        // (both carry strings): refused when the spec is read.
        case(
            "non-UTF-8 container path",
            after_good(dev(b"/dev/xv\xff\xfedb", B, 7, 2)),
            &["/dev/xv\u{fffd}\u{fffd}db", "is not valid UTF-8"],
        ),
    ];
    for (i, bad) in BAD_BDFS.iter().enumerate() {
        let group = 13 + i as i64;
        cases.push(Case {
            name: "malformed BDF in an IOMMU group",
            spec: spec(
                after_good(dev(format!("/dev/vfio/{group}").as_bytes(), C, 243, group)),
                vec![],
            ),
            want: vec![
                format!("/dev/vfio/{group} (c 243:{group})"),
                format!("VFIO group {group}"),
                format!("malformed entry {bad:?}"),
            ],
            only_busy: false,
        });
    }
    // The manager: the busy sandbox's container uses disk 7:3 read-write; a
    // cgroup rule without `w` makes this container's use read-only, which
    // cannot share the guest disk.
    let mut ro = case_with_rules(
        "same disk read-write and read-only",
        after_good(dev(b"/dev/xvdr", B, 7, 3)),
        vec![{
            let mut r = LinuxDeviceCgroup::default();
            r.set_allow(true)
                .set_typ(Some(B))
                .set_major(Some(7))
                .set_minor(Some(3))
                .set_access(Some("rm".into()));
            r
        }],
        &[
            "as /dev/xvdr (b 7:",
            "cannot share",
            "as /dev/own (b 7:",
            "already used read-write",
        ],
    );
    ro.only_busy = true;
    cases.push(ro);
    cases
}

#[tokio::test]
async fn hostile_specs_are_refused_by_name_and_leave_nothing_behind() {
    let host = Host::new(8);
    let resolver = host.resolver();
    let cases = hostile_cases(&host);
    let mut runs = 0;
    for c in &cases {
        for busy in [false, true] {
            if c.only_busy && !busy {
                continue;
            }
            let what = format!("{} (busy sandbox: {busy})", c.name);
            let sb = Sandbox::new(&host, busy).await;
            let before = sb.mgr.snapshot();
            let plugged_before = sb.backend.plugged();
            let e = admit(&sb.mgr, &resolver, &c.spec)
                .await
                .map(|d| d.len())
                .expect_err(&what);
            for want in &c.want {
                assert!(e.contains(want.as_str()), "{what}: {want:?} not in: {e}");
            }
            let after = sb.mgr.snapshot();
            assert_eq!(after.devices, before.devices, "{what}: devices changed");
            assert_eq!(
                after.allocators, before.allocators,
                "{what}: allocators changed"
            );
            if !busy {
                assert!(after.devices.is_empty(), "{what}: {:?}", after.devices);
                let empty = SandboxState::new(sb.mgr.config()).allocators;
                assert_eq!(
                    after.allocators, empty,
                    "{what}: an allocator holds something"
                );
            }
            assert_eq!(
                sb.backend.plugged().keys().collect::<Vec<_>>(),
                plugged_before.keys().collect::<Vec<_>>(),
                "{what}"
            );
            check_consistency(&sb.mgr, &sb.backend).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                sb.file_state(),
                after,
                "{what}: state file differs from memory"
            );
            // Every hotplug the rollback needed was undone by an unplug.
            let ops = sb.backend.ops();
            let count = |op| ops.iter().filter(|(o, _)| *o == op).count();
            assert_eq!(
                count(BackendOp::Hotplug),
                count(BackendOp::Unplug),
                "{what}: {ops:?}"
            );
            runs += 1;
        }
    }
    eprintln!(
        "hostile input cases: {} refused specs ({runs} runs: empty and busy sandbox)",
        cases.len()
    );
}

/// 1,000 disks in one spec on virtio-scsi: all resolved, attached (one SCSI
/// address each), then detached and removed, leaving nothing.
#[tokio::test]
async fn a_thousand_devices_are_attached_and_removed() {
    const N: u32 = 1000;
    let host = Host::new(N);
    let devices: Vec<LinuxDevice> = (0..N)
        .map(|n| {
            dev(
                format!("/dev/loop{n}").as_bytes(),
                LinuxDeviceType::B,
                7,
                n.into(),
            )
        })
        .collect();
    let s = spec(devices, vec![]);
    let backend = Arc::new(RecordingBackend::new());
    // Saving a 1,000-device state after each of ~4,000 steps costs minutes
    // in a debug build; the writes are covered elsewhere.
    let mgr =
        DeviceManager::new(config(BlockDriver::VirtioScsi), backend.clone(), NullStore).unwrap();
    let done = admit(&mgr, &host.resolver(), &s).await.unwrap();
    assert_eq!(done.len(), N as usize);
    assert_eq!(backend.plugged().len(), N as usize);
    let snap = mgr.snapshot();
    assert_eq!(snap.allocators.block.held().count(), N as usize);
    check_consistency(&mgr, &backend).unwrap();
    release(&mgr, &done).await;
    assert!(mgr.is_empty());
    assert!(backend.plugged().is_empty());
    assert_eq!(
        mgr.snapshot().allocators,
        SandboxState::new(mgr.config()).allocators
    );
    check_consistency(&mgr, &backend).unwrap();
    eprintln!("hostile input: {N} devices attached and removed");
}

/// 1,000 disks on virtio-blk need 1,000 PCI slots; there are 31. The 32nd
/// is refused by name and the 31 attached before are rolled back.
#[tokio::test]
async fn a_thousand_devices_beyond_the_pci_slots_are_refused_cleanly() {
    const N: u32 = 1000;
    let host = Host::new(N);
    let devices: Vec<LinuxDevice> = (0..N)
        .map(|n| {
            dev(
                format!("/dev/loop{n}").as_bytes(),
                LinuxDeviceType::B,
                7,
                n.into(),
            )
        })
        .collect();
    let s = spec(devices, vec![]);
    let dir = tempdir();
    let backend = Arc::new(RecordingBackend::new());
    let mut store = FileStore::open(dir.path()).unwrap();
    assert!(store.load().unwrap().is_none());
    let mgr = DeviceManager::new(config(BlockDriver::VirtioBlk), backend.clone(), store).unwrap();
    let e = admit(&mgr, &host.resolver(), &s).await.unwrap_err();
    assert!(
        e.contains("dev31 (block ") && e.contains("as /dev/loop31 (b 7:31))"),
        "{e}"
    );
    assert!(e.contains("PCI slot space exhausted"), "{e}");
    assert!(mgr.is_empty());
    assert!(backend.plugged().is_empty());
    assert_eq!(
        backend
            .ops()
            .iter()
            .filter(|(o, _)| *o == BackendOp::Hotplug)
            .count(),
        31
    );
    assert_eq!(
        mgr.snapshot().allocators,
        SandboxState::new(mgr.config()).allocators
    );
    check_consistency(&mgr, &backend).unwrap();
    let bytes = fs::read(dir.path().join(STATE_FILE)).unwrap();
    assert_eq!(decode(&bytes, mgr.config()).unwrap(), mgr.snapshot());
}

/// Inputs that look hostile but are legitimate are accepted, and cleaned up.
#[tokio::test]
async fn lookalikes_are_accepted_and_cleaned_up() {
    let host = Host::new(4);
    let resolver = host.resolver();
    let sb = Sandbox::new(&host, false).await;
    // QAT (c 241:0) with the store enabled is an ordinary char device, never
    // vhost-user; b 241:0 in the store is vhost-user-blk; one disk at two
    // container paths is one device with two references.
    let s = spec(
        vec![
            dev(b"/dev/qat_adf_ctl", LinuxDeviceType::C, 241, 0),
            dev(b"/dev/vda", LinuxDeviceType::B, 241, 0),
            dev(b"/dev/xvda", LinuxDeviceType::B, 7, 0),
            dev(b"/dev/xvda-again", LinuxDeviceType::B, 7, 0),
            dev(b"/dev/a..b", LinuxDeviceType::B, 7, 1),
        ],
        vec![],
    );
    let done = admit(&sb.mgr, &resolver, &s).await.unwrap();
    let kinds: Vec<&'static str> = done
        .iter()
        .map(|(id, _)| sb.mgr.get(id).unwrap().kind.name())
        .collect();
    assert_eq!(
        kinds,
        ["generic", "vhost-user-blk", "block", "block", "block"]
    );
    assert_eq!(done[2].0, done[3].0, "one disk, two references");
    let qat = sb.mgr.get(&done[0].0).unwrap();
    assert_eq!(qat.host_path, host.dev.join("qat_adf_ctl"));
    assert_eq!(qat.kind, DeviceKind::Generic);
    // Generic devices never reach the hypervisor; the shared disk once.
    let hotplugs: Vec<String> = sb
        .backend
        .ops()
        .into_iter()
        .filter(|(o, _)| *o == BackendOp::Hotplug)
        .map(|(_, id)| id)
        .collect();
    assert_eq!(hotplugs.len(), 3, "{hotplugs:?}");
    check_consistency(&sb.mgr, &sb.backend).unwrap();
    release(&sb.mgr, &done).await;
    assert!(sb.mgr.is_empty());
    assert!(sb.backend.plugged().is_empty());
    check_consistency(&sb.mgr, &sb.backend).unwrap();
    assert_eq!(sb.file_state(), sb.mgr.snapshot());
}
