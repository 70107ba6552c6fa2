//! Host resolution against fixture trees built in a tempdir: real device
//! nodes (mknod, so these tests need root), unix sockets and symlinks.
//!
//! Every test lives in a `resolve_*` module so `cargo test resolve` runs them.
use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use capsule_devmgr::device::{
    Bdf, DevType, DeviceInfo, DeviceKind, HostDevice, VfioFunction, VfioMode, VhostUserKind,
};
use capsule_devmgr::resolve::{ResolveError, Resolver, ResolverConfig};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

/// A `/sys` + `/dev` + vhost-user store tree in a tempdir.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    sys: PathBuf,
    dev: PathBuf,
    store: PathBuf,
    /// Unix listeners must stay alive for the sockets to stay sockets.
    _sockets: Vec<UnixListener>,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
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
        Self {
            _tmp: tmp,
            root,
            sys,
            dev,
            store,
            _sockets: Vec::new(),
        }
    }

    fn resolver(&self, store: bool) -> Resolver {
        Resolver::new(ResolverConfig {
            sysfs_root: self.sys.clone(),
            dev_root: self.dev.clone(),
            vhost_user_store: store.then(|| self.store.clone()),
            ..ResolverConfig::default()
        })
        .unwrap()
    }

    /// `<sys>/dev/<kind>/MAJ:MIN` as a symlink to a `<sys>/devices/...`
    /// directory holding `uevent`, like real sysfs.
    fn sysfs_dev(&self, kind: &str, major: u32, minor: u32, uevent: &str) {
        let target = self
            .sys
            .join(format!("devices/virtual/{kind}-{major}-{minor}"));
        write(&target.join("uevent"), uevent.as_bytes());
        let link = self.sys.join(format!("dev/{kind}/{major}:{minor}"));
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        symlink(&target, &link).unwrap();
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

    /// A device node `<dev>/<rel>`.
    fn node(&self, rel: &str, kind: SFlag, major: u32, minor: u32) -> PathBuf {
        let path = self.dev.join(rel);
        Self::node_at(&path, kind, major, minor);
        path
    }

    fn socket_at(&mut self, path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        self._sockets.push(UnixListener::bind(path).unwrap());
    }

    /// A PCI function directory under `<sys>/devices/pci0000:00/`, linked
    /// from IOMMU group `group`.
    fn pci(&self, group: &str, bdf: &str, attrs: Pci) -> PathBuf {
        let dir = self.sys.join("devices/pci0000:00").join(bdf);
        write(
            &dir.join("vendor"),
            format!("0x{:04x}\n", attrs.vendor).as_bytes(),
        );
        write(
            &dir.join("device"),
            format!("0x{:04x}\n", attrs.device).as_bytes(),
        );
        write(
            &dir.join("class"),
            format!("0x{:06x}\n", attrs.class).as_bytes(),
        );
        write(&dir.join("config"), &vec![0u8; attrs.config_len]);
        write(&dir.join("resource"), attrs.resource.as_bytes());
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

    /// A legacy VFIO group node `<dev>/vfio/<group>` (c 243:<group>) with
    /// its sysfs entry.
    fn vfio_group_node(&self, group: u32) {
        self.node(&format!("vfio/{group}"), SFlag::S_IFCHR, 243, group);
        self.sysfs_dev(
            "char",
            243,
            group,
            &format!("MAJOR=243\nMINOR={group}\nDEVNAME=vfio/{group}\n"),
        );
    }
}

struct Pci {
    vendor: u16,
    device: u16,
    class: u32,
    config_len: usize,
    resource: String,
}

const SMALL_BAR: &str = "0x00000000fa000000 0x00000000faffffff 0x0000000000040200\n";
const LARGE_BAR: &str = "0x0000038000000000 0x00000387ffffffff 0x000000000014220c\n";
const NO_BAR: &str = "0x0000000000000000 0x0000000000000000 0x0000000000000000\n";

fn gpu() -> Pci {
    Pci {
        vendor: 0x10de,
        device: 0x20b0,
        class: 0x030200,
        config_len: 4096,
        resource: format!("{SMALL_BAR}{LARGE_BAR}{NO_BAR}"),
    }
}

fn audio() -> Pci {
    Pci {
        vendor: 0x10de,
        device: 0x1aef,
        class: 0x040300,
        config_len: 256,
        resource: SMALL_BAR.into(),
    }
}

fn bridge() -> Pci {
    Pci {
        vendor: 0x8086,
        device: 0x2030,
        class: 0x060400,
        config_len: 4096,
        resource: NO_BAR.repeat(6),
    }
}

fn write(path: &Path, content: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

fn info(path: &str, dev_type: DevType, major: u32, minor: u32) -> DeviceInfo {
    DeviceInfo {
        file_mode: Some(0o666),
        uid: Some(0),
        gid: Some(0),
        ..DeviceInfo::new(path, dev_type, major, minor)
    }
}

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

fn err_text<T: std::fmt::Debug>(r: Result<T, ResolveError>) -> String {
    r.unwrap_err().to_string()
}

mod resolve_nodes {
    use super::*;

    #[test]
    fn char_device_with_sysfs_entry() {
        let fx = Fixture::new();
        fx.sysfs_dev("char", 1, 3, "MAJOR=1\nMINOR=3\nDEVNAME=null\n");
        let host = fx.node("null", SFlag::S_IFCHR, 1, 3);
        let req = info("/dev/null", DevType::Char, 1, 3);
        let got = fx.resolver(false).resolve(&req).unwrap();
        assert_eq!(
            got,
            HostDevice {
                info: Some(req),
                host_path: host,
                kind: DeviceKind::Generic
            }
        );
    }

    #[test]
    fn unbuffered_char_uses_the_char_directory() {
        let fx = Fixture::new();
        fx.sysfs_dev("char", 1, 3, "MAJOR=1\nMINOR=3\nDEVNAME=null\n");
        fx.node("null", SFlag::S_IFCHR, 1, 3);
        let got = fx
            .resolver(false)
            .resolve(&info("/dev/null", DevType::CharUnbuffered, 1, 3))
            .unwrap();
        assert_eq!(got.kind, DeviceKind::Generic);
    }

    #[test]
    fn char_device_without_sysfs_entry_uses_the_container_path() {
        let fx = Fixture::new();
        let host = fx.node("fuse", SFlag::S_IFCHR, 10, 229);
        let got = fx
            .resolver(false)
            .resolve(&info("/dev/fuse", DevType::Char, 10, 229))
            .unwrap();
        assert_eq!((got.host_path, got.kind), (host, DeviceKind::Generic));
    }

    #[test]
    fn no_sysfs_entry_and_no_node_is_a_clear_error() {
        let fx = Fixture::new();
        let msg = err_text(
            fx.resolver(false)
                .resolve(&info("/dev/xvdb", DevType::Block, 8, 0)),
        );
        let want = format!(
            "device /dev/xvdb (b 8:0): no sysfs entry and {} is not a block device 8:0 on the host",
            fx.dev.join("xvdb").display()
        );
        assert!(msg.starts_with(&want), "{msg}");
    }

    #[test]
    fn no_sysfs_entry_and_wrong_node_is_rejected() {
        let fx = Fixture::new();
        fx.node("fuse", SFlag::S_IFCHR, 10, 230);
        fx.node("xvdb", SFlag::S_IFCHR, 8, 0);
        let r = fx.resolver(false);
        let msg = err_text(r.resolve(&info("/dev/fuse", DevType::Char, 10, 229)));
        assert!(
            msg.contains("not a char device 10:229") && msg.contains("char device 10:230"),
            "{msg}"
        );
        let msg = err_text(r.resolve(&info("/dev/xvdb", DevType::Block, 8, 0)));
        assert!(
            msg.contains("not a block device 8:0") && msg.contains("it is a char device"),
            "{msg}"
        );
    }

    #[test]
    fn symlinked_node_is_rejected() {
        let fx = Fixture::new();
        let real = fx.node("real-fuse", SFlag::S_IFCHR, 10, 229);
        symlink(real, fx.dev.join("fuse")).unwrap();
        let msg = err_text(
            fx.resolver(false)
                .resolve(&info("/dev/fuse", DevType::Char, 10, 229)),
        );
        assert!(msg.contains("it is a symlink"), "{msg}");
    }

    #[test]
    fn loop_block_device() {
        let fx = Fixture::new();
        fx.sysfs_dev(
            "block",
            7,
            3,
            "MAJOR=7\nMINOR=3\nDEVNAME=loop3\nDEVTYPE=disk\nDISKSEQ=12\n",
        );
        let host = fx.node("loop3", SFlag::S_IFBLK, 7, 3);
        let got = fx
            .resolver(false)
            .resolve(&info("/dev/loop3", DevType::Block, 7, 3))
            .unwrap();
        assert_eq!((got.host_path, got.kind), (host, DeviceKind::Block));
    }

    #[test]
    fn devname_wins_over_the_container_path() {
        let fx = Fixture::new();
        fx.sysfs_dev(
            "block",
            8,
            0,
            "MAJOR=8\nMINOR=0\nDEVNAME=sda\nDEVTYPE=disk\n",
        );
        let host = fx.node("sda", SFlag::S_IFBLK, 8, 0);
        let got = fx
            .resolver(false)
            .resolve(&info("/dev/xvdb", DevType::Block, 8, 0))
            .unwrap();
        assert_eq!((got.host_path, got.kind), (host, DeviceKind::Block));
        assert_eq!(got.info.unwrap().container_path, Path::new("/dev/xvdb"));
    }

    #[test]
    fn devname_node_must_exist_and_match() {
        let fx = Fixture::new();
        fx.sysfs_dev("block", 8, 0, "MAJOR=8\nMINOR=0\nDEVNAME=sda\n");
        let msg = err_text(
            fx.resolver(false)
                .resolve(&info("/dev/xvdb", DevType::Block, 8, 0)),
        );
        assert!(
            msg.contains("sysfs names it sda") && msg.contains("does not exist"),
            "{msg}"
        );
        fx.node("sda", SFlag::S_IFBLK, 8, 16);
        let msg = err_text(
            fx.resolver(false)
                .resolve(&info("/dev/xvdb", DevType::Block, 8, 0)),
        );
        assert!(msg.contains("block device 8:16"), "{msg}");
    }

    #[test]
    fn uevent_numbers_must_agree() {
        let fx = Fixture::new();
        fx.sysfs_dev("block", 8, 0, "MAJOR=8\nMINOR=1\nDEVNAME=sda\n");
        fx.node("sda", SFlag::S_IFBLK, 8, 0);
        let msg = err_text(
            fx.resolver(false)
                .resolve(&info("/dev/sda", DevType::Block, 8, 0)),
        );
        assert!(msg.contains("says 8:1, not the requested 8:0"), "{msg}");
    }

    #[test]
    fn malformed_uevent_names_the_line() {
        let fx = Fixture::new();
        fx.sysfs_dev("block", 8, 0, "MAJOR=8\nMINOR=0\ngarbage\n");
        let msg = err_text(
            fx.resolver(false)
                .resolve(&info("/dev/sda", DevType::Block, 8, 0)),
        );
        assert!(
            msg.starts_with("device /dev/sda (b 8:0): ") && msg.contains("uevent line 3"),
            "{msg}"
        );
    }

    #[test]
    fn devname_escaping_dev_is_rejected() {
        let fx = Fixture::new();
        fx.sysfs_dev("block", 8, 0, "MAJOR=8\nMINOR=0\nDEVNAME=../etc/sda\n");
        let msg = err_text(
            fx.resolver(false)
                .resolve(&info("/dev/sda", DevType::Block, 8, 0)),
        );
        assert!(msg.contains("DEVNAME") && msg.contains("'..'"), "{msg}");
    }

    #[test]
    fn fifo_must_be_a_fifo_on_the_host() {
        let fx = Fixture::new();
        let fifo = fx.dev.join("myfifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        write(&fx.dev.join("notfifo"), b"x");
        let r = fx.resolver(false);
        let got = r
            .resolve(&info("/dev/myfifo", DevType::Fifo, 0, 0))
            .unwrap();
        assert_eq!((got.host_path, got.kind), (fifo, DeviceKind::Generic));
        let msg = err_text(r.resolve(&info("/dev/notfifo", DevType::Fifo, 0, 0)));
        assert!(msg.contains("regular file, not a fifo"), "{msg}");
        let msg = err_text(r.resolve(&info("/dev/nofifo", DevType::Fifo, 0, 0)));
        assert!(msg.contains("not a fifo on the host"), "{msg}");
    }

    #[test]
    fn hand_built_invalid_requests_are_rejected_before_any_lookup() {
        let fx = Fixture::new();
        let r = fx.resolver(true);
        for bad in [
            info("relative/uevent", DevType::Char, 1, 3),
            info("/dev/../sys", DevType::Char, 1, 3),
            info("/dev/f", DevType::Fifo, 1, 0),
            info("/dev/x", DevType::Block, 4096, 0),
        ] {
            let e = r.resolve(&bad).unwrap_err();
            assert!(matches!(e, ResolveError::InvalidDevice { .. }), "{e}");
        }
    }

    #[test]
    fn resolve_all_stops_at_the_first_error() {
        let fx = Fixture::new();
        fx.node("fuse", SFlag::S_IFCHR, 10, 229);
        fx.sysfs_dev("char", 1, 3, "MAJOR=1\nMINOR=3\nDEVNAME=null\n");
        fx.node("null", SFlag::S_IFCHR, 1, 3);
        let r = fx.resolver(false);
        let ok = [
            info("/dev/fuse", DevType::Char, 10, 229),
            info("/dev/null", DevType::Char, 1, 3),
        ];
        let got = r.resolve_all(&ok).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].host_path, fx.dev.join("null"));
        let bad = [
            ok[0].clone(),
            info("/dev/missing", DevType::Char, 10, 1),
            ok[1].clone(),
        ];
        assert!(err_text(r.resolve_all(&bad)).contains("/dev/missing"));
    }
}

mod resolve_vfio {
    use super::*;

    #[test]
    fn legacy_group_skips_bridges_and_sorts_functions() {
        let fx = Fixture::new();
        fx.vfio_group_node(12);
        fx.pci("12", "0000:3b:00.1", audio());
        fx.pci("12", "0000:3a:00.0", bridge());
        fx.pci("12", "0000:3b:00.0", gpu());
        let got = fx
            .resolver(false)
            .resolve(&info("/dev/vfio/12", DevType::Char, 243, 12))
            .unwrap();
        assert_eq!(got.host_path, fx.dev.join("vfio/12"));
        let DeviceKind::Vfio(group) = got.kind else {
            panic!("{:?}", got.kind)
        };
        assert_eq!((group.group.as_str(), group.mode), ("12", VfioMode::Legacy));
        assert_eq!(
            group.functions,
            vec![
                VfioFunction::Pci {
                    bdf: bdf("0000:3b:00.0"),
                    vendor: 0x10de,
                    device: 0x20b0,
                    class: 0x030200,
                    is_pcie: true,
                    large_bar: true,
                },
                VfioFunction::Pci {
                    bdf: bdf("0000:3b:00.1"),
                    vendor: 0x10de,
                    device: 0x1aef,
                    class: 0x040300,
                    is_pcie: false,
                    large_bar: false,
                },
            ]
        );
    }

    #[test]
    fn group_node_without_sysfs_entry_is_found_by_container_path() {
        let fx = Fixture::new();
        fx.node("vfio/7", SFlag::S_IFCHR, 243, 7);
        fx.pci("7", "0000:5e:00.0", audio());
        let got = fx
            .resolver(false)
            .resolve(&info("/dev/vfio/7", DevType::Char, 243, 7))
            .unwrap();
        assert!(
            matches!(got.kind, DeviceKind::Vfio(ref g) if g.group == "7" && g.functions.len() == 1)
        );
    }

    #[test]
    fn container_node_is_generic() {
        let fx = Fixture::new();
        fx.sysfs_dev("char", 10, 196, "MAJOR=10\nMINOR=196\nDEVNAME=vfio/vfio\n");
        let host = fx.node("vfio/vfio", SFlag::S_IFCHR, 10, 196);
        let got = fx
            .resolver(false)
            .resolve(&info("/dev/vfio/vfio", DevType::Char, 10, 196))
            .unwrap();
        assert_eq!((got.host_path, got.kind), (host, DeviceKind::Generic));
    }

    #[test]
    fn group_of_only_bridges_is_an_error() {
        let fx = Fixture::new();
        fx.vfio_group_node(13);
        fx.pci(
            "13",
            "0000:00:00.0",
            Pci {
                class: 0x060000,
                ..bridge()
            },
        );
        fx.pci("13", "0000:00:01.0", bridge());
        let msg =
            err_text(
                fx.resolver(false)
                    .resolve(&info("/dev/vfio/13", DevType::Char, 243, 13)),
            );
        assert!(
            msg.contains("VFIO group 13") && msg.contains("no devices to pass through"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_entry_is_an_error_naming_the_group() {
        let fx = Fixture::new();
        fx.vfio_group_node(14);
        fx.pci("14", "0000:3b:00.0", gpu());
        fx.pci("14", "0000:3b:00.9", audio());
        let msg =
            err_text(
                fx.resolver(false)
                    .resolve(&info("/dev/vfio/14", DevType::Char, 243, 14)),
            );
        assert!(
            msg.contains("VFIO group 14") && msg.contains("\"0000:3b:00.9\""),
            "{msg}"
        );

        let fx = Fixture::new();
        fx.vfio_group_node(14);
        fx.group_link("14", "not-a-device", &fx.sys);
        let msg =
            err_text(
                fx.resolver(false)
                    .resolve(&info("/dev/vfio/14", DevType::Char, 243, 14)),
            );
        assert!(
            msg.contains("VFIO group 14") && msg.contains("not-a-device"),
            "{msg}"
        );
    }

    #[test]
    fn broken_attribute_is_an_error() {
        let fx = Fixture::new();
        fx.vfio_group_node(16);
        let dir = fx.pci("16", "0000:3b:00.0", gpu());
        write(&dir.join("vendor"), b"nvidia\n");
        let msg =
            err_text(
                fx.resolver(false)
                    .resolve(&info("/dev/vfio/16", DevType::Char, 243, 16)),
            );
        assert!(msg.contains("0000:3b:00.0: vendor"), "{msg}");
    }

    #[test]
    fn mediated_device() {
        let fx = Fixture::new();
        fx.vfio_group_node(15);
        let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
        let mdev = fx.sys.join("devices/pci0000:00/0000:00:02.0").join(uuid);
        fs::create_dir_all(&mdev).unwrap();
        fx.group_link("15", uuid, &mdev);
        let got = fx
            .resolver(false)
            .resolve(&info("/dev/vfio/15", DevType::Char, 243, 15))
            .unwrap();
        let DeviceKind::Vfio(group) = got.kind else {
            panic!("{:?}", got.kind)
        };
        assert_eq!(
            group.functions,
            vec![VfioFunction::Mediated {
                uuid: uuid.into(),
                sysfsdev: mdev
            }]
        );
    }

    #[test]
    fn missing_group_is_an_error() {
        let fx = Fixture::new();
        fx.vfio_group_node(42);
        let msg =
            err_text(
                fx.resolver(false)
                    .resolve(&info("/dev/vfio/42", DevType::Char, 243, 42)),
            );
        assert!(
            msg.contains("/dev/vfio/42 (c 243:42)") && msg.contains("no such IOMMU group"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_vfio_node_is_an_error() {
        let fx = Fixture::new();
        fx.node("vfio/foo", SFlag::S_IFCHR, 243, 99);
        let msg =
            err_text(
                fx.resolver(false)
                    .resolve(&info("/dev/vfio/foo", DevType::Char, 243, 99)),
            );
        assert!(msg.contains("vfio/foo is neither a group"), "{msg}");
    }

    #[test]
    fn iommufd_cdev() {
        let fx = Fixture::new();
        fx.sysfs_dev(
            "char",
            511,
            0,
            "MAJOR=511\nMINOR=0\nDEVNAME=vfio/devices/vfio0\n",
        );
        let host = fx.node("vfio/devices/vfio0", SFlag::S_IFCHR, 511, 0);
        let dir = fx.pci("3", "0000:3b:00.0", gpu());
        let class_dir = fx.sys.join("class/vfio-dev/vfio0");
        fs::create_dir_all(&class_dir).unwrap();
        symlink(&dir, class_dir.join("device")).unwrap();
        let got = fx
            .resolver(false)
            .resolve(&info("/dev/vfio/devices/vfio0", DevType::Char, 511, 0))
            .unwrap();
        assert_eq!(got.host_path, host);
        let DeviceKind::Vfio(group) = got.kind else {
            panic!("{:?}", got.kind)
        };
        assert_eq!(
            (group.group.as_str(), group.mode),
            ("vfio0", VfioMode::Iommufd)
        );
        assert!(
            matches!(group.functions.as_slice(), [VfioFunction::Pci { bdf: b, is_pcie: true, large_bar: true, .. }] if *b == bdf("0000:3b:00.0"))
        );
    }

    #[test]
    fn iommufd_cdev_without_class_link_is_an_error() {
        let fx = Fixture::new();
        fx.node("vfio/devices/vfio1", SFlag::S_IFCHR, 511, 1);
        let msg = err_text(fx.resolver(false).resolve(&info(
            "/dev/vfio/devices/vfio1",
            DevType::Char,
            511,
            1,
        )));
        assert!(
            msg.contains("VFIO cdev vfio1") && msg.contains("class/vfio-dev/vfio1/device"),
            "{msg}"
        );
    }

    #[test]
    fn block_device_under_vfio_is_rejected() {
        let fx = Fixture::new();
        fx.node("vfio/12", SFlag::S_IFBLK, 243, 12);
        let msg =
            err_text(
                fx.resolver(false)
                    .resolve(&info("/dev/vfio/12", DevType::Block, 243, 12)),
            );
        assert!(msg.contains("block device cannot be a VFIO node"), "{msg}");
    }
}

mod resolve_vhost_store {
    use super::*;

    /// `devices/<name>` (b major:minor) plus `sockets/<name>` as a socket.
    fn store_entry(fx: &mut Fixture, name: &str, major: u32, minor: u32) {
        Fixture::node_at(
            &fx.store.join("block/devices").join(name),
            SFlag::S_IFBLK,
            major,
            minor,
        );
        let sock = fx.store.join("block/sockets").join(name);
        fx.socket_at(&sock);
    }

    #[test]
    fn blk_and_scsi_resolve_to_their_sockets() {
        let mut fx = Fixture::new();
        store_entry(&mut fx, "vhost-blk0", 241, 0);
        store_entry(&mut fx, "vhost-scsi1", 242, 1);
        let r = fx.resolver(true);
        for (name, major, minor, vhost) in [
            ("vhost-blk0", 241, 0, VhostUserKind::Blk),
            ("vhost-scsi1", 242, 1, VhostUserKind::Scsi),
        ] {
            let got = r
                .resolve(&info("/dev/vda", DevType::Block, major, minor))
                .unwrap();
            assert_eq!(got.host_path, fx.store.join("block/devices").join(name));
            assert_eq!(
                got.kind,
                DeviceKind::VhostUser {
                    vhost,
                    socket: fx.store.join("block/sockets").join(name),
                    tag: String::new()
                }
            );
        }
    }

    #[test]
    fn odd_entries_do_not_abort_the_search() {
        let mut fx = Fixture::new();
        let devices = fx.store.join("block/devices");
        write(&devices.join("aaa-regular"), b"x");
        fs::create_dir(devices.join("aaa-dir")).unwrap();
        symlink("/nonexistent/capsule", devices.join("aaa-dangling")).unwrap();
        Fixture::node_at(&devices.join("aaa-char"), SFlag::S_IFCHR, 241, 3);
        store_entry(&mut fx, "zzz-blk", 241, 3);
        let got = fx
            .resolver(true)
            .resolve(&info("/dev/vda", DevType::Block, 241, 3))
            .unwrap();
        assert_eq!(got.host_path, devices.join("zzz-blk"));
    }

    #[test]
    fn symlinked_device_entry_escaping_the_store_is_skipped() {
        let fx = Fixture::new();
        let outside = fx.root.join("outside/blk");
        Fixture::node_at(&outside, SFlag::S_IFBLK, 241, 5);
        symlink(&outside, fx.store.join("block/devices/escape")).unwrap();
        let mut fx = fx;
        fx.socket_at(&fx.store.join("block/sockets/escape"));
        let msg = err_text(
            fx.resolver(true)
                .resolve(&info("/dev/vda", DevType::Block, 241, 5)),
        );
        assert!(msg.contains("no block node 241:5"), "{msg}");
        assert!(
            msg.contains(&fx.store.display().to_string()) && msg.contains("/dev/vda (b 241:5)"),
            "{msg}"
        );
    }

    #[test]
    fn symlinked_socket_is_rejected() {
        let mut fx = Fixture::new();
        Fixture::node_at(
            &fx.store.join("block/devices/linked"),
            SFlag::S_IFBLK,
            241,
            6,
        );
        let outside = fx.root.join("outside/sock");
        fx.socket_at(&outside);
        symlink(&outside, fx.store.join("block/sockets/linked")).unwrap();
        let msg = err_text(
            fx.resolver(true)
                .resolve(&info("/dev/vda", DevType::Block, 241, 6)),
        );
        assert!(
            msg.contains("block/sockets/linked: is a symlink, not a unix socket"),
            "{msg}"
        );
    }

    #[test]
    fn regular_file_socket_is_rejected() {
        let fx = Fixture::new();
        Fixture::node_at(
            &fx.store.join("block/devices/regular"),
            SFlag::S_IFBLK,
            241,
            7,
        );
        write(&fx.store.join("block/sockets/regular"), b"");
        let msg = err_text(
            fx.resolver(true)
                .resolve(&info("/dev/vda", DevType::Block, 241, 7)),
        );
        assert!(msg.contains("regular file, not a unix socket"), "{msg}");
    }

    #[test]
    fn missing_socket_is_rejected() {
        let fx = Fixture::new();
        Fixture::node_at(
            &fx.store.join("block/devices/nosock"),
            SFlag::S_IFBLK,
            242,
            8,
        );
        let msg = err_text(
            fx.resolver(true)
                .resolve(&info("/dev/sdb", DevType::Block, 242, 8)),
        );
        assert!(
            msg.contains("block/sockets/nosock: socket is missing"),
            "{msg}"
        );
    }

    #[test]
    fn symlinked_store_directories_are_rejected() {
        for sub in ["block/sockets", "block/devices", "block"] {
            let mut fx = Fixture::new();
            store_entry(&mut fx, "vhost-blk0", 241, 0);
            let moved = fx.root.join("moved");
            fs::rename(fx.store.join(sub), &moved).unwrap();
            symlink(&moved, fx.store.join(sub)).unwrap();
            let msg =
                err_text(
                    fx.resolver(true)
                        .resolve(&info("/dev/vda", DevType::Block, 241, 0)),
                );
            assert!(
                msg.contains(&format!("{sub}: is a symlink, not a directory")),
                "{sub}: {msg}"
            );
        }
    }

    #[test]
    fn duplicate_numbers_in_the_store_are_ambiguous() {
        let mut fx = Fixture::new();
        store_entry(&mut fx, "a", 241, 9);
        store_entry(&mut fx, "b", 241, 9);
        let msg = err_text(
            fx.resolver(true)
                .resolve(&info("/dev/vda", DevType::Block, 241, 9)),
        );
        assert!(msg.contains("2 nodes have this number: a, b"), "{msg}");
    }

    #[test]
    fn qat_char_device_241_is_an_ordinary_char_device() {
        let mut fx = Fixture::new();
        store_entry(&mut fx, "vhost-blk0", 241, 0);
        fx.sysfs_dev("char", 241, 0, "MAJOR=241\nMINOR=0\nDEVNAME=qat_adf_ctl\n");
        let host = fx.node("qat_adf_ctl", SFlag::S_IFCHR, 241, 0);
        let got = fx
            .resolver(true)
            .resolve(&info("/dev/qat_adf_ctl", DevType::Char, 241, 0))
            .unwrap();
        assert_eq!((got.host_path, got.kind), (host, DeviceKind::Generic));
    }

    #[test]
    fn enabled_store_never_falls_back_to_an_ordinary_block_device() {
        let fx = Fixture::new();
        fx.node("vdx", SFlag::S_IFBLK, 241, 10);
        let msg = err_text(
            fx.resolver(true)
                .resolve(&info("/dev/vdx", DevType::Block, 241, 10)),
        );
        assert!(
            msg.contains("not resolved as ordinary block devices"),
            "{msg}"
        );
    }

    #[test]
    fn disabled_store_makes_241_an_ordinary_block_device() {
        let mut fx = Fixture::new();
        store_entry(&mut fx, "vhost-blk0", 241, 0);
        let host = fx.node("vdx", SFlag::S_IFBLK, 241, 0);
        let got = fx
            .resolver(false)
            .resolve(&info("/dev/vdx", DevType::Block, 241, 0))
            .unwrap();
        assert_eq!((got.host_path, got.kind), (host, DeviceKind::Block));
    }

    #[test]
    fn store_reached_through_a_symlinked_root_still_resolves() {
        let mut fx = Fixture::new();
        store_entry(&mut fx, "vhost-blk0", 241, 0);
        let alias = fx.root.join("store-alias");
        symlink(&fx.store, &alias).unwrap();
        let r = Resolver::new(ResolverConfig {
            sysfs_root: fx.sys.clone(),
            dev_root: fx.dev.clone(),
            vhost_user_store: Some(alias.clone()),
            ..ResolverConfig::default()
        })
        .unwrap();
        let got = r
            .resolve(&info("/dev/vda", DevType::Block, 241, 0))
            .unwrap();
        assert_eq!(got.host_path, alias.join("block/devices/vhost-blk0"));
    }
}
