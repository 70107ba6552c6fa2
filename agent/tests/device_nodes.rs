//! Device nodes in a container root (mknod as root, in a tempdir) and the
//! spec rewrite from host to guest numbers.
use capsule_agent::device;

use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use capsule_agent_protocol::agent::{Device, DeviceKind};
use device::{create_nodes, rewrite_spec, DeviceError, PreparedDevice};
use nix::sys::stat::{major, makedev, minor, mknod, Mode, SFlag};
use oci_spec::runtime::Spec;

fn prepared(id: &str, path: &str, ty: &str, guest: (u32, u32)) -> PreparedDevice {
    let mut d = Device::new();
    d.id = id.into();
    d.kind = DeviceKind::DEVICE_KIND_BLK_PCI.into();
    d.guest_address = "05".into();
    d.container_path = path.into();
    d.dev_type = ty.into();
    d.cgroup_access = "rwm".into();
    PreparedDevice {
        device: d,
        guest_major: guest.0,
        guest_minor: guest.1,
        guest_node: PathBuf::from("/dev/vdb"),
    }
}

fn root() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    fs::create_dir_all(root.join("dev")).unwrap();
    (dir, root)
}

fn meta(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap()
}

// ---- nodes ----

#[test]
fn creates_the_node_with_numbers_mode_and_owner_whatever_the_umask() {
    let (_d, root) = root();
    let mut p = prepared("d1", "/dev/xvdb", "b", (254, 16));
    p.device.file_mode = 0o640;
    p.device.uid = 1000;
    p.device.gid = 1001;
    let mut c = prepared("d2", "/dev/vfio/12", "c", (243, 1));
    c.device.file_mode = 0; // default 0666
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
    let res = create_nodes(&root, &[p, c]);
    nix::sys::stat::umask(old);
    res.unwrap();
    let m = meta(&root.join("dev/xvdb"));
    assert!(m.file_type().is_block_device());
    assert_eq!((major(m.rdev()), minor(m.rdev())), (254, 16));
    assert_eq!(m.permissions().mode() & 0o7777, 0o640);
    assert_eq!((m.uid(), m.gid()), (1000, 1001));
    let m = meta(&root.join("dev/vfio/12"));
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), makedev(243, 1));
    assert_eq!(m.permissions().mode() & 0o7777, 0o666);
    assert_eq!((m.uid(), m.gid()), (0, 0));
}

#[test]
fn generic_fifo_and_u_type() {
    let (_d, root) = root();
    let mut fifo = prepared("g1", "/dev/myfifo", "p", (0, 0));
    fifo.device.kind = DeviceKind::DEVICE_KIND_GENERIC.into();
    let mut u = prepared("g2", "/dev/null2", "u", (1, 3));
    u.device.kind = DeviceKind::DEVICE_KIND_GENERIC.into();
    create_nodes(&root, &[fifo, u]).unwrap();
    assert!(meta(&root.join("dev/myfifo")).file_type().is_fifo());
    let m = meta(&root.join("dev/null2"));
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), makedev(1, 3));
}

#[test]
fn stale_device_node_is_replaced_but_nothing_else() {
    let (_d, root) = root();
    mknod(
        &root.join("dev/xvdb"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        makedev(254, 0),
    )
    .unwrap();
    create_nodes(&root, &[prepared("d1", "/dev/xvdb", "b", (254, 32))]).unwrap();
    assert_eq!(meta(&root.join("dev/xvdb")).rdev(), makedev(254, 32));

    fs::write(root.join("dev/file"), "data").unwrap();
    let err = create_nodes(&root, &[prepared("d1", "/dev/file", "b", (254, 32))]).unwrap_err();
    assert!(
        err.to_string().contains("exists and is not a device node"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(root.join("dev/file")).unwrap(), "data");

    fs::create_dir(root.join("dev/dir")).unwrap();
    assert!(create_nodes(&root, &[prepared("d1", "/dev/dir", "b", (254, 32))]).is_err());

    // A symlink at the path is not followed nor replaced.
    let outside = root.parent().unwrap().join("outside-node");
    fs::write(&outside, "x").unwrap();
    symlink(&outside, root.join("dev/link")).unwrap();
    let err = create_nodes(&root, &[prepared("d1", "/dev/link", "b", (254, 32))]).unwrap_err();
    assert!(err.to_string().contains("not a device node"), "{err}");
    assert!(meta(&outside).file_type().is_file());
}

#[test]
fn missing_parents_are_created() {
    let (_d, root) = root();
    create_nodes(
        &root,
        &[prepared("d1", "/dev/disk/by-capsule/data", "b", (8, 16))],
    )
    .unwrap();
    assert!(meta(&root.join("dev/disk/by-capsule")).is_dir());
    assert_eq!(
        meta(&root.join("dev/disk/by-capsule/data")).rdev(),
        makedev(8, 16)
    );
}

#[test]
fn symlinked_parents_may_not_leave_the_root() {
    let (d, root) = root();
    let outside = d.path().join("outside");
    fs::create_dir(&outside).unwrap();
    // Absolute symlink (to the host's view) and a relative one climbing out.
    symlink(&outside, root.join("dev/abs")).unwrap();
    symlink("../../outside", root.join("dev/rel")).unwrap();
    symlink("/dev", root.join("hostdev")).unwrap();
    for path in [
        "/dev/abs/xvdb",
        "/dev/rel/xvdb",
        "/dev/rel/new/xvdb",
        "/hostdev/xvdb",
    ] {
        let err = create_nodes(&root, &[prepared("d1", path, "b", (254, 16))]).unwrap_err();
        assert!(matches!(err, DeviceError::Node { .. }), "{path}: {err:?}");
        assert!(
            err.to_string()
                .contains("symlink leading outside the container root"),
            "{path}: {err}"
        );
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "something was created outside"
    );
    // A symlink that stays inside is fine.
    fs::create_dir(root.join("realdir")).unwrap();
    symlink("../realdir", root.join("dev/inside")).unwrap();
    create_nodes(&root, &[prepared("d1", "/dev/inside/xvdb", "b", (254, 16))]).unwrap();
    assert!(meta(&root.join("realdir/xvdb"))
        .file_type()
        .is_block_device());
}

#[test]
fn bad_container_paths_are_refused() {
    let (_d, root) = root();
    fs::write(root.join("notadir"), "").unwrap();
    for (path, want) in [
        ("dev/xvdb", "not absolute"),
        ("/dev/../xvdb", "'..'"),
        ("/", "names no file"),
        ("/notadir/xvdb", "not a directory"),
        ("/dev/x\0y", "NUL"),
    ] {
        let err = create_nodes(&root, &[prepared("d9", path, "b", (254, 16))]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(want) && msg.contains("d9 (blk-pci at 05)"),
            "{path}: {msg}"
        );
    }
    let err = create_nodes(&root, &[prepared("d9", "/dev/x", "q", (254, 16))]).unwrap_err();
    assert!(err.to_string().contains("unknown device type"), "{err}");
    let err = create_nodes(&root.join("missing"), &[]).unwrap_err();
    assert!(matches!(err, DeviceError::ContainerRoot { .. }), "{err:?}");
}

// ---- spec rewrite ----

fn spec(json: serde_json::Value) -> Spec {
    serde_json::from_value(json).unwrap()
}

fn with_host(mut p: PreparedDevice, host: (i64, i64)) -> PreparedDevice {
    p.device.host_major = host.0;
    p.device.host_minor = host.1;
    p
}

#[test]
fn rewrites_rules_and_devices_to_guest_numbers() {
    let mut s = spec(serde_json::json!({
        "ociVersion": "1.1.0",
        "linux": {
            "devices": [
                {"path": "/dev/xvdb", "type": "b", "major": 8, "minor": 0, "fileMode": 432},
                {"path": "/dev/xvdc", "type": "b", "major": 8, "minor": 16},
                {"path": "/dev/other", "type": "c", "major": 8, "minor": 0}
            ],
            "resources": {"devices": [
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "b", "major": 8, "minor": 0, "access": "rwm"},
                {"allow": true, "type": "b", "major": 8, "minor": 16, "access": "rwm"},
                {"allow": true, "type": "c", "major": 8, "minor": 0, "access": "rw"},
                {"allow": true, "type": "b", "major": 8, "access": "r"}
            ]}
        }
    }));
    // A swap: host 8:0 is guest 8:16 and host 8:16 is guest 8:0.
    let a = with_host(prepared("d1", "/dev/xvdb", "b", (8, 16)), (8, 0));
    let mut b = with_host(prepared("d2", "/dev/xvdc", "b", (8, 0)), (8, 16));
    b.device.read_only = true;
    rewrite_spec(&mut s, &[a, b]).unwrap();
    let v = serde_json::to_value(&s).unwrap();
    let devs = &v["linux"]["devices"];
    assert_eq!(
        (devs[0]["major"].as_i64(), devs[0]["minor"].as_i64()),
        (Some(8), Some(16))
    );
    assert_eq!(devs[0]["fileMode"], 432);
    assert_eq!(
        (devs[1]["major"].as_i64(), devs[1]["minor"].as_i64()),
        (Some(8), Some(0))
    );
    assert_eq!(
        (devs[2]["major"].as_i64(), devs[2]["minor"].as_i64()),
        (Some(8), Some(0)),
        "char 8:0 untouched"
    );
    let rules = &v["linux"]["resources"]["devices"];
    assert_eq!(rules.as_array().unwrap().len(), 5);
    assert_eq!(
        rules[0],
        serde_json::json!({"allow": false, "access": "rwm"})
    );
    assert_eq!(
        rules[1],
        serde_json::json!({"allow": true, "type": "b", "major": 8, "minor": 16, "access": "rwm"})
    );
    assert_eq!(
        rules[2],
        serde_json::json!({"allow": true, "type": "b", "major": 8, "minor": 0, "access": "rm"})
    );
    assert_eq!(
        rules[3],
        serde_json::json!({"allow": true, "type": "c", "major": 8, "minor": 0, "access": "rw"})
    );
    assert_eq!(
        rules[4],
        serde_json::json!({"allow": true, "type": "b", "major": 8, "access": "r"})
    );
}

#[test]
fn a_device_without_a_rule_gets_an_allow_rule() {
    let mut s = spec(serde_json::json!({
        "ociVersion": "1.1.0",
        "linux": {"resources": {"devices": [{"allow": false, "access": "rwm"}]}}
    }));
    let mut p = with_host(prepared("d1", "/dev/xvdb", "b", (254, 16)), (8, 32));
    p.device.cgroup_access = "rw".into();
    p.device.read_only = true;
    let mut fifo = prepared("g", "/dev/fifo", "p", (0, 0));
    fifo.device.kind = DeviceKind::DEVICE_KIND_GENERIC.into();
    rewrite_spec(&mut s, &[p, fifo]).unwrap();
    let v = serde_json::to_value(&s).unwrap();
    let rules = v["linux"]["resources"]["devices"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        rules,
        vec![
            serde_json::json!({"allow": false, "access": "rwm"}),
            serde_json::json!({"allow": true, "type": "b", "major": 254, "minor": 16, "access": "r"}),
        ]
    );
    // No linux section at all: nothing to do, no error.
    let mut bare = spec(serde_json::json!({"ociVersion": "1.1.0"}));
    rewrite_spec(
        &mut bare,
        &[with_host(prepared("d1", "/dev/x", "b", (1, 1)), (2, 2))],
    )
    .unwrap();
}

#[test]
fn one_host_device_with_two_guest_numbers_is_refused() {
    let mut s = spec(serde_json::json!({"ociVersion": "1.1.0", "linux": {}}));
    let a = with_host(prepared("d1", "/dev/a", "b", (254, 16)), (8, 0));
    let b = with_host(prepared("d2", "/dev/b", "b", (254, 32)), (8, 0));
    let err = rewrite_spec(&mut s, &[a.clone(), b]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("d2 (blk-pci at 05)")
            && msg.contains("d1 (blk-pci at 05)")
            && msg.contains("b 8:0"),
        "{msg}"
    );
    // The same device at two paths is fine.
    let a2 = with_host(prepared("d1", "/dev/a2", "b", (254, 16)), (8, 0));
    rewrite_spec(&mut s, &[a, a2]).unwrap();
}

#[test]
fn chmod_without_proc_falls_back_safely() {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let (_d, root) = root();
    let r = root.clone();
    // A thread of its own in a private mount namespace without /proc (the
    // libc's no-follow chmod goes through /proc/self/fd).
    capsule_hypervisor::testkit::require_root("a private mount namespace without /proc");
    let res = std::thread::spawn(move || -> Result<(), String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| format!("making / private: {e}"))?;
        umount2("/proc", MntFlags::MNT_DETACH).map_err(|e| format!("umount /proc: {e}"))?;
        assert!(!Path::new("/proc/self/fd").exists());
        let mut p = prepared("d1", "/dev/xvdb", "b", (254, 16));
        p.device.file_mode = 0o604;
        create_nodes(&r, &[p]).map_err(|e| e.to_string())
    })
    .join()
    .unwrap();
    res.unwrap();
    assert!(Path::new("/proc/self/fd").exists(), "the host lost /proc");
    let m = meta(&root.join("dev/xvdb"));
    assert_eq!(m.permissions().mode() & 0o7777, 0o604);
    assert_eq!(m.rdev(), makedev(254, 16));
}
