//! Device discovery against fixture sysfs trees: address matching for each
//! kind, waits (timeouts, uevent wake-ups, stale devices), request
//! validation, and the uevent parser.
use capsule_agent::device;
#[path = "fixtures/device/tree.rs"]
mod tree;

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsule_agent_protocol::agent::{Device, DeviceKind};
use device::sysfs::{self, Found, Target};
use device::uevent::{Action, Uevent};
use device::{prepare, DeviceError, DeviceWatcher, WatcherConfig};
use proptest::prelude::*;
use tree::Tree;

fn found(name: &str, major: u32, minor: u32, block: bool) -> Found {
    Found {
        name: name.into(),
        major,
        minor,
        block,
    }
}

fn pci(s: &str) -> capsule_agent_protocol::wire::PciPath {
    s.parse().unwrap()
}

fn dev(id: &str, kind: DeviceKind, addr: &str, path: &str) -> Device {
    let mut d = Device::new();
    d.id = id.into();
    d.kind = kind.into();
    d.guest_address = addr.into();
    d.container_path = path.into();
    d.cgroup_access = "rwm".into();
    d
}

fn watcher(t: &Tree, poll: Duration) -> Arc<DeviceWatcher> {
    let cfg = WatcherConfig {
        poll_interval: poll,
        scsi_rescan_after: Duration::from_millis(100),
    };
    DeviceWatcher::polling_only(t.sys.clone(), t.dev.clone(), cfg)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn add_event(devpath: &str) -> Uevent {
    Uevent::parse(
        format!("add@{devpath}\0ACTION=add\0DEVPATH={devpath}\0SUBSYSTEM=block\0").as_bytes(),
    )
    .unwrap()
}

// ---- address matching ----

#[test]
fn blk_pci_on_root_bus() {
    let t = Tree::new();
    t.virtio_blk("0000:00:05.0", "virtio2", "vdb", 254, 16);
    assert_eq!(
        sysfs::pci_block(&t.sys, &pci("05")),
        Ok(found("vdb", 254, 16, true))
    );
    assert_eq!(
        sysfs::pci_device(&t.sys, &pci("05")).unwrap(),
        t.sys.join("devices/pci0000:00/0000:00:05.0")
    );
    let err = sysfs::pci_block(&t.sys, &pci("06")).unwrap_err();
    assert!(err.contains("no PCI device 0000:00:06.0"), "{err}");
    // A non-zero function.
    t.virtio_blk("0000:00:07.3", "virtio5", "vdf", 254, 80);
    assert_eq!(
        sysfs::pci_block(&t.sys, &pci("07.3")),
        Ok(found("vdf", 254, 80, true))
    );
}

#[test]
fn blk_pci_behind_pci_bridge() {
    let t = Tree::new();
    t.bridge("0000:00:1e.0", "0000:01");
    t.virtio_blk("0000:00:1e.0/0000:01:03.0", "virtio3", "vdc", 254, 32);
    assert_eq!(
        sysfs::pci_block(&t.sys, &pci("1e/03")),
        Ok(found("vdc", 254, 32, true))
    );
    let err = sysfs::pci_block(&t.sys, &pci("1e/04")).unwrap_err();
    assert!(err.contains("no PCI device 0000:01:04.0"), "{err}");
    // The bridge itself has no disk; a non-bridge has no secondary bus.
    assert!(sysfs::pci_block(&t.sys, &pci("1e"))
        .unwrap_err()
        .contains("no block device"));
    t.virtio_blk("0000:00:05.0", "virtio2", "vdb", 254, 16);
    assert!(sysfs::pci_block(&t.sys, &pci("05/01"))
        .unwrap_err()
        .contains("no secondary bus"));
}

#[test]
fn blk_pci_behind_pcie_root_port_and_deeper_chains() {
    let t = Tree::new();
    t.bridge("0000:00:10.0", "0000:01");
    t.virtio_blk("0000:00:10.0/0000:01:00.0", "virtio4", "vdd", 254, 48);
    assert_eq!(
        sysfs::pci_block(&t.sys, &pci("10/00")),
        Ok(found("vdd", 254, 48, true))
    );
    // Bridge behind a bridge: 1e -> bus 02, 0000:02:01.0 -> bus 03.
    t.bridge("0000:00:1e.0", "0000:02");
    t.bridge("0000:00:1e.0/0000:02:01.0", "0000:03");
    t.virtio_blk(
        "0000:00:1e.0/0000:02:01.0/0000:03:1f.0",
        "virtio9",
        "vde",
        254,
        64,
    );
    assert_eq!(
        sysfs::pci_block(&t.sys, &pci("1e/01/1f")),
        Ok(found("vde", 254, 64, true))
    );
}

#[test]
fn bridge_without_pci_bus_entry_uses_its_children() {
    let t = Tree::new();
    t.pci("0000:00:1e.0");
    t.virtio_blk("0000:00:1e.0/0000:05:02.0", "virtio3", "vdc", 254, 32);
    assert_eq!(
        sysfs::pci_block(&t.sys, &pci("1e/02")),
        Ok(found("vdc", 254, 32, true))
    );
}

#[test]
fn scsi_prefers_the_virtio_scsi_host() {
    let t = Tree::new();
    let ata = t.scsi_host("0000:00:01.1", 0, "ata_piix");
    let vs = t.scsi_host("0000:00:04.0", 2, "virtio_scsi");
    t.scsi_disk(&ata, 0, (1, 44), "sda", (8, 0));
    let addr = "1:44".parse().unwrap();
    // Only the other host has it: taken (any host whose entry exists).
    assert_eq!(
        sysfs::scsi_block(&t.sys, addr),
        Ok(found("sda", 8, 0, true))
    );
    t.scsi_disk(&vs, 2, (1, 44), "sdb", (8, 16));
    assert_eq!(
        sysfs::scsi_block(&t.sys, addr),
        Ok(found("sdb", 8, 16, true))
    );
    assert_eq!(sysfs::scsi_hosts(&t.sys), vec![(2, true), (0, false)]);
    let err = sysfs::scsi_block(&t.sys, "1:45".parse().unwrap()).unwrap_err();
    assert!(err.contains("no SCSI device 0:1:45"), "{err}");
}

#[test]
fn scsi_rescan_writes_the_address_to_virtio_hosts_only() {
    let t = Tree::new();
    t.scsi_host("0000:00:01.1", 0, "ata_piix");
    t.scsi_host("0000:00:04.0", 1, "virtio_scsi");
    assert_eq!(sysfs::scsi_rescan(&t.sys, "3:7".parse().unwrap()), 1);
    let scan =
        |h: u32| fs::read_to_string(t.sys.join(format!("class/scsi_host/host{h}/scan"))).unwrap();
    assert_eq!(scan(1), "0 3 7");
    assert_eq!(scan(0), "");
}

#[test]
fn pmem_by_block_link_or_nd_bus() {
    let t = Tree::new();
    t.pmem(0, 259, 0, true);
    t.pmem(1, 259, 1, false);
    assert_eq!(
        sysfs::pmem_block(&t.sys, 0),
        Ok(found("pmem0", 259, 0, true))
    );
    assert_eq!(
        sysfs::pmem_block(&t.sys, 1),
        Ok(found("pmem1", 259, 1, true))
    );
    assert!(sysfs::pmem_block(&t.sys, 2).unwrap_err().contains("pmem2"));
}

#[test]
fn vfio_group_of_functions() {
    let t = Tree::new();
    t.iommu_function("0000:00:06.0", 7, "vfio-pci");
    t.iommu_function("0000:00:06.1", 7, "vfio-pci");
    t.iommu_function("0000:00:08.0", 9, "vfio-pci");
    let err = sysfs::vfio_group(&t.sys, &[pci("06")]).unwrap_err();
    assert!(err.contains("IOMMU group 7 has no VFIO node"), "{err}");
    t.vfio_node(7, 243, 1);
    assert_eq!(
        sysfs::vfio_group(&t.sys, &[pci("06"), pci("06.1")]),
        Ok(found("vfio/7", 243, 1, false))
    );
    let err = sysfs::vfio_group(&t.sys, &[pci("06"), pci("08")]).unwrap_err();
    assert!(err.contains("different IOMMU groups (7, 9)"), "{err}");
    t.pci("0000:00:0a.0");
    assert!(sysfs::vfio_group(&t.sys, &[pci("0a")])
        .unwrap_err()
        .contains("no IOMMU group"));
}

#[test]
fn vfio_bind_overrides_the_driver() {
    let t = Tree::new();
    let f = t.iommu_function("0000:00:06.0", 7, "e1000e");
    let bound = t.iommu_function("0000:00:07.0", 8, "vfio-pci");
    assert_eq!(sysfs::vfio_bind(&t.sys, &[pci("06"), pci("07")]), 1);
    assert_eq!(
        fs::read_to_string(f.join("driver_override")).unwrap(),
        "vfio-pci"
    );
    assert_eq!(
        fs::read_to_string(t.sys.join("bus/pci/drivers/e1000e/unbind")).unwrap(),
        "0000:00:06.0"
    );
    assert_eq!(
        fs::read_to_string(t.sys.join("bus/pci/drivers_probe")).unwrap(),
        "0000:00:06.0"
    );
    assert_eq!(
        fs::read_to_string(bound.join("driver_override")).unwrap(),
        "(null)\n"
    );
}

#[test]
fn blk_mmio_by_name_and_dev_file_parsing() {
    let t = Tree::new();
    t.disk(
        &t.sys.join("devices/platform/a000000.virtio_mmio/virtio0"),
        "vda",
        254,
        0,
    );
    assert_eq!(
        sysfs::find(&t.sys, &Target::BlockName("vda".into())),
        Ok(found("vda", 254, 0, true))
    );
    assert!(sysfs::named_block(&t.sys, "vdz").is_err());
    for bad in ["", "254", "a:b", "254:", "99999999999:1", ":1"] {
        fs::write(t.sys.join("block/vda/dev"), bad).unwrap();
        assert!(sysfs::named_block(&t.sys, "vda").is_err(), "{bad:?}");
    }
}

// ---- waits through prepare ----

#[test]
fn prepare_resolves_every_kind() {
    let t = Tree::new();
    t.virtio_blk("0000:00:05.0", "virtio2", "vdb", 254, 16);
    t.bridge("0000:00:1e.0", "0000:01");
    t.virtio_blk("0000:00:1e.0/0000:01:03.0", "virtio3", "vdc", 254, 32);
    let host = t.scsi_host("0000:00:04.0", 0, "virtio_scsi");
    t.scsi_disk(&host, 0, (1, 44), "sdb", (8, 16));
    t.pmem(0, 259, 0, true);
    t.iommu_function("0000:00:06.0", 7, "vfio-pci");
    t.vfio_node(7, 243, 1);
    t.disk(
        &t.sys.join("devices/platform/a000000.virtio_mmio/virtio0"),
        "vda",
        254,
        0,
    );
    let mut generic = dev("d7", DeviceKind::DEVICE_KIND_GENERIC, "", "/dev/fuse");
    generic.dev_type = "c".into();
    generic.host_major = 10;
    generic.host_minor = 229;
    let req = vec![
        dev("d1", DeviceKind::DEVICE_KIND_BLK_PCI, "05", "/dev/xvdb"),
        dev(
            "d2",
            DeviceKind::DEVICE_KIND_VHOST_USER_BLK,
            "1e/03",
            "/dev/xvdc",
        ),
        dev("d3", DeviceKind::DEVICE_KIND_SCSI, "1:44", "/dev/xvdd"),
        dev("d4", DeviceKind::DEVICE_KIND_PMEM, "0", "/dev/pm"),
        dev("d5", DeviceKind::DEVICE_KIND_VFIO, "06", "/dev/vfio/12"),
        dev(
            "d6",
            DeviceKind::DEVICE_KIND_BLK_MMIO,
            "vda",
            "/dev/root-disk",
        ),
        generic,
    ];
    let w = watcher(&t, Duration::from_millis(50));
    let got = rt()
        .block_on(prepare(&w, &req, Duration::from_secs(1)))
        .unwrap();
    let summary: Vec<(String, u32, u32, PathBuf, String)> = got
        .iter()
        .map(|p| {
            (
                p.device.id.clone(),
                p.guest_major,
                p.guest_minor,
                p.guest_node.clone(),
                p.device.dev_type.clone(),
            )
        })
        .collect();
    let d = |n: &str| t.dev.join(n);
    assert_eq!(
        summary,
        vec![
            ("d1".into(), 254, 16, d("vdb"), "b".into()),
            ("d2".into(), 254, 32, d("vdc"), "b".into()),
            ("d3".into(), 8, 16, d("sdb"), "b".into()),
            ("d4".into(), 259, 0, d("pmem0"), "b".into()),
            ("d5".into(), 243, 1, d("vfio/7"), "c".into()),
            ("d6".into(), 254, 0, d("vda"), "b".into()),
            ("d7".into(), 10, 229, PathBuf::from("/dev/fuse"), "c".into()),
        ]
    );
    // The same through wait_device (what Storage mounts use).
    let g = rt()
        .block_on(w.wait_device(
            DeviceKind::DEVICE_KIND_BLK_PCI,
            "1e/03",
            Duration::from_millis(100),
        ))
        .unwrap();
    assert_eq!(
        (g.node, g.major, g.minor, g.block),
        (d("vdc"), 254, 32, true)
    );
}

#[test]
fn missing_device_times_out_naming_it() {
    let t = Tree::new();
    t.virtio_blk("0000:00:05.0", "virtio2", "vdb", 254, 16);
    let w = watcher(&t, Duration::from_millis(50));
    let req = vec![
        dev("dev1", DeviceKind::DEVICE_KIND_BLK_PCI, "05", "/dev/xvda"),
        dev(
            "dev3",
            DeviceKind::DEVICE_KIND_BLK_PCI,
            "02/01",
            "/dev/xvdb",
        ),
    ];
    let start = Instant::now();
    let err = rt()
        .block_on(prepare(&w, &req, Duration::from_millis(300)))
        .unwrap_err();
    let waited = start.elapsed();
    assert!(err.is_timeout(), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("device dev3 (blk-pci at 02/01): not visible in the guest after 0.3s (no PCI device 0000:00:02.0"),
        "{msg}"
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    match err {
        DeviceError::Timeout { device, .. } => {
            assert_eq!(
                (device.id(), device.kind(), device.address()),
                ("dev3", "blk-pci", "02/01")
            )
        }
        other => panic!("{other:?}"),
    }
    // Wrong kind for the address (the disk is not SCSI) and a pmem that is not there.
    let err = rt()
        .block_on(prepare(
            &w,
            &[dev("s", DeviceKind::DEVICE_KIND_SCSI, "0:1", "/dev/s")],
            Duration::ZERO,
        ))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("device s (scsi at 0:1): not visible in the guest after 0s"),
        "{err}"
    );
    let err = rt()
        .block_on(prepare(
            &w,
            &[dev("p", DeviceKind::DEVICE_KIND_PMEM, "3", "/dev/p")],
            Duration::from_millis(60),
        ))
        .unwrap_err();
    assert!(err.to_string().contains("(no block device pmem3)"), "{err}");
}

#[test]
fn removed_then_readded_device_gives_the_new_name() {
    let t = Tree::new();
    let old = t.virtio_blk("0000:00:05.0", "virtio2", "vdb", 254, 16);
    let w = watcher(&t, Duration::from_millis(50));
    let req = [dev(
        "d1",
        DeviceKind::DEVICE_KIND_BLK_PCI,
        "05",
        "/dev/xvdb",
    )];
    let rt = rt();
    let first = rt
        .block_on(prepare(&w, &req, Duration::from_secs(1)))
        .unwrap();
    assert_eq!(first[0].guest_node, t.dev.join("vdb"));

    // Hot-unplug: the old disk is gone, and a wait now times out: nothing
    // remembered "05 is vdb".
    t.remove_disk(&old);
    w.inject(
        &Uevent::parse(
            b"remove@/devices/pci0000:00/0000:00:05.0/virtio2/block/vdb\0ACTION=remove\0",
        )
        .unwrap(),
    );
    let err = rt
        .block_on(prepare(&w, &req, Duration::from_millis(150)))
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");

    // Re-plugged at the same address, probed under another name.
    t.virtio_blk("0000:00:05.0", "virtio7", "vdh", 254, 112);
    let again = rt
        .block_on(prepare(&w, &req, Duration::from_secs(1)))
        .unwrap();
    assert_eq!(
        (
            again[0].guest_node.clone(),
            again[0].guest_major,
            again[0].guest_minor
        ),
        (t.dev.join("vdh"), 254, 112)
    );
}

#[test]
fn a_stale_guest_node_is_not_matched() {
    let t = Tree::new();
    t.virtio_blk("0000:00:05.0", "virtio2", "vdb", 254, 16);
    // devtmpfs still shows an old vdb with other numbers.
    t.node("vdb", true, 254, 0);
    let w = watcher(&t, Duration::from_millis(20));
    let req = [dev(
        "d1",
        DeviceKind::DEVICE_KIND_BLK_PCI,
        "05",
        "/dev/xvdb",
    )];
    let err = rt()
        .block_on(prepare(&w, &req, Duration::from_millis(100)))
        .unwrap_err();
    assert!(
        err.to_string().contains("is not the block device 254:16"),
        "{err}"
    );
    t.node("vdb", true, 254, 16);
    assert!(rt()
        .block_on(prepare(&w, &req, Duration::from_millis(100)))
        .is_ok());
}

#[test]
fn a_device_that_appears_during_the_wait_is_woken_by_the_uevent() {
    let t = Arc::new(Tree::new());
    // Polling every hour: only the event can end the wait in time.
    let w = watcher(&t, Duration::from_secs(3600));
    let req = [dev(
        "d1",
        DeviceKind::DEVICE_KIND_BLK_PCI,
        "1e/03",
        "/dev/xvdb",
    )];
    let rt = rt();
    let (t2, w2) = (t.clone(), w.clone());
    let start = Instant::now();
    let got = rt.block_on(async move {
        let plug = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            t2.bridge("0000:00:1e.0", "0000:01");
            t2.virtio_blk("0000:00:1e.0/0000:01:03.0", "virtio3", "vdc", 254, 32);
            w2.inject(&add_event(
                "/devices/pci0000:00/0000:00:1e.0/0000:01:03.0/virtio3/block/vdc",
            ));
        });
        let r = prepare(&w, &req, Duration::from_secs(20)).await;
        plug.await.unwrap();
        r
    });
    let got = got.unwrap();
    assert_eq!(got[0].guest_node, t.dev.join("vdc"));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_device_is_found_by_polling_when_its_uevent_is_lost() {
    let t = Arc::new(Tree::new());
    let w = watcher(&t, Duration::from_millis(50));
    let t2 = t.clone();
    let plugger = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        t2.virtio_blk("0000:00:05.0", "virtio2", "vdb", 254, 16);
    });
    let req = [dev(
        "d1",
        DeviceKind::DEVICE_KIND_BLK_PCI,
        "05",
        "/dev/xvdb",
    )];
    let got = rt()
        .block_on(prepare(&w, &req, Duration::from_secs(5)))
        .unwrap();
    plugger.join().unwrap();
    assert_eq!(got[0].guest_node, t.dev.join("vdb"));
    assert_eq!(w.events_seen(), 0);
}

#[test]
fn scsi_wait_rescans_then_finds_the_disk() {
    let t = Arc::new(Tree::new());
    let host = t.scsi_host("0000:00:04.0", 0, "virtio_scsi");
    let w = watcher(&t, Duration::from_millis(30));
    let t2 = t.clone();
    // The "kernel": the disk appears once the scan file was written.
    let kernel = std::thread::spawn(move || {
        let scan = t2.sys.join("class/scsi_host/host0/scan");
        for _ in 0..200 {
            if fs::read_to_string(&scan).unwrap_or_default() == "0 2 5" {
                t2.scsi_disk(&host, 0, (2, 5), "sdc", (8, 32));
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    });
    let req = [dev("d1", DeviceKind::DEVICE_KIND_SCSI, "2:5", "/dev/xvdc")];
    let got = rt().block_on(prepare(&w, &req, Duration::from_secs(5)));
    assert!(kernel.join().unwrap(), "no rescan was asked for");
    assert_eq!(got.unwrap()[0].guest_node, t.dev.join("sdc"));
}

// ---- request validation ----

#[test]
fn duplicate_container_paths_name_both_devices() {
    let t = Tree::new();
    let w = watcher(&t, Duration::from_millis(50));
    let req = [
        dev("dev1", DeviceKind::DEVICE_KIND_BLK_PCI, "05", "/dev/xvdb"),
        dev("dev2", DeviceKind::DEVICE_KIND_SCSI, "0:1", "/dev//xvdb"),
    ];
    let err = rt()
        .block_on(prepare(&w, &req, Duration::from_secs(10)))
        .unwrap_err();
    assert!(matches!(err, DeviceError::Duplicate { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "devices dev1 (blk-pci at 05) and dev2 (scsi at 0:1) both want container path /dev/xvdb"
    );
    assert!(!err.is_timeout());
}

#[test]
fn two_devices_on_one_guest_node_are_refused() {
    let t = Tree::new();
    t.virtio_blk("0000:00:05.0", "virtio2", "vdb", 254, 16);
    let w = watcher(&t, Duration::from_millis(50));
    // One device at two container paths is fine.
    let same = [
        dev("dev1", DeviceKind::DEVICE_KIND_BLK_PCI, "05", "/dev/xvdb"),
        dev("dev1", DeviceKind::DEVICE_KIND_BLK_PCI, "05", "/dev/disk1"),
    ];
    assert_eq!(
        rt().block_on(prepare(&w, &same, Duration::from_secs(1)))
            .unwrap()
            .len(),
        2
    );
    let clash = [
        dev("dev1", DeviceKind::DEVICE_KIND_BLK_PCI, "05", "/dev/xvdb"),
        dev(
            "dev2",
            DeviceKind::DEVICE_KIND_VHOST_USER_BLK,
            "05",
            "/dev/xvdc",
        ),
    ];
    let err = rt()
        .block_on(prepare(&w, &clash, Duration::from_secs(1)))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DeviceError::SameNode { .. }), "{err:?}");
    assert!(
        msg.contains("dev1 (blk-pci at 05)") && msg.contains("dev2 (vhost-user-blk at 05)"),
        "{msg}"
    );
}

#[test]
fn invalid_requests_are_refused_before_waiting() {
    let t = Tree::new();
    let w = watcher(&t, Duration::from_millis(50));
    let base = || dev("bad", DeviceKind::DEVICE_KIND_BLK_PCI, "05", "/dev/xvdb");
    let mut cases: Vec<(Device, &str)> = Vec::new();
    let mut d = base();
    d.guest_address = "zz".into();
    cases.push((d, "PCI path"));
    let mut d = base();
    d.guest_address = "".into();
    cases.push((d, "PCI path"));
    let mut d = base();
    d.kind = DeviceKind::DEVICE_KIND_SCSI.into();
    d.guest_address = "1".into();
    cases.push((d, "SCSI address"));
    let mut d = base();
    d.kind = DeviceKind::DEVICE_KIND_PMEM.into();
    d.guest_address = "-1".into();
    cases.push((d, "pmem index"));
    let mut d = base();
    d.kind = DeviceKind::DEVICE_KIND_BLK_MMIO.into();
    d.guest_address = "../vda".into();
    cases.push((d, "drive name"));
    let mut d = base();
    d.kind = DeviceKind::DEVICE_KIND_VFIO.into();
    d.guest_address = "06,".into();
    cases.push((d, "PCI path"));
    let mut d = base();
    d.kind = DeviceKind::DEVICE_KIND_UNSPECIFIED.into();
    cases.push((d, "kind not set"));
    let mut d = base();
    d.kind = capsule_agent_protocol::protobuf::EnumOrUnknown::from_i32(99);
    cases.push((d, "kind not set"));
    let mut d = base();
    d.container_path = "dev/xvdb".into();
    cases.push((d, "not absolute"));
    let mut d = base();
    d.container_path = "/dev/../etc/passwd".into();
    cases.push((d, "'..'"));
    let mut d = base();
    d.container_path = "/".into();
    cases.push((d, "names no file"));
    let mut d = base();
    d.dev_type = "c".into();
    cases.push((d, "device type"));
    let mut d = base();
    d.cgroup_access = "rwx".into();
    cases.push((d, "cgroup access"));
    let mut d = base();
    d.kind = DeviceKind::DEVICE_KIND_GENERIC.into();
    d.dev_type = "x".into();
    cases.push((d, "device type"));
    let mut d = base();
    d.kind = DeviceKind::DEVICE_KIND_GENERIC.into();
    d.dev_type = "c".into();
    d.host_major = -1;
    cases.push((d, "out of range"));
    for (d, want) in cases {
        let err = rt()
            .block_on(prepare(
                &w,
                std::slice::from_ref(&d),
                Duration::from_secs(10),
            ))
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DeviceError::Invalid { .. }), "{d:?}: {err:?}");
        assert!(
            msg.starts_with("device bad (") && msg.contains(want),
            "{d:?}: {msg}"
        );
    }
}

#[test]
fn start_needs_a_runtime() {
    let err = DeviceWatcher::start("/sys".into(), "/dev".into())
        .err()
        .unwrap();
    assert!(err.to_string().contains("no tokio runtime"), "{err}");
}

// ---- uevent parser ----

#[test]
fn uevent_parses_add_and_remove() {
    let msg = b"add@/devices/pci0000:00/0000:00:05.0/virtio2/block/vdb\0ACTION=add\0\
DEVPATH=/devices/pci0000:00/0000:00:05.0/virtio2/block/vdb\0SUBSYSTEM=block\0MAJOR=254\0MINOR=16\0DEVNAME=vdb\0DEVTYPE=disk\0SEQNUM=1234\0";
    let ev = Uevent::parse(msg).unwrap();
    assert_eq!(ev.action, Action::Add);
    assert_eq!(
        ev.devpath,
        "/devices/pci0000:00/0000:00:05.0/virtio2/block/vdb"
    );
    assert_eq!(ev.get("DEVNAME"), Some("vdb"));
    assert_eq!(ev.get("MAJOR"), Some("254"));
    assert_eq!(ev.get("NOPE"), None);

    let ev = Uevent::parse(b"remove@/devices/virtual/block/loop3\0ACTION=remove\0").unwrap();
    assert_eq!(ev.action, Action::Remove);
    let ev = Uevent::parse(b"change@/devices/virtual/block/loop3").unwrap();
    assert_eq!(ev.action, Action::Change);
    let ev = Uevent::parse(b"frob@/x").unwrap();
    assert_eq!(ev.action, Action::Other("frob".into()));
    assert!(ev.env.is_empty());
}

#[test]
fn uevent_rejects_garbage() {
    for bad in [
        &b""[..],
        b"\0",
        b"add",
        b"add@",
        b"@/x",
        b"add@x",
        b"\xff@/x\0A=B",
        b"libudev\0feed",
    ] {
        assert!(Uevent::parse(bad).is_err(), "{bad:?}");
    }
    // Malformed fields are skipped, not fatal.
    let ev = Uevent::parse(b"add@/x\0noequals\0=v\0K=\xffv\0K2=a=b").unwrap();
    assert_eq!(ev.env.len(), 2);
    assert_eq!(ev.get("K2"), Some("a=b"));
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn uevent_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Uevent::parse(&bytes);
    }

    #[test]
    fn uevent_parse_never_panics_on_near_valid(
        action in "[a-z]{0,8}", path in "[/a-z0-9:.]{0,40}",
        fields in proptest::collection::vec("[A-Z=\\x00-\\x7f]{0,12}", 0..8),
    ) {
        let msg = format!("{action}@{path}\0{}", fields.join("\0"));
        if let Ok(ev) = Uevent::parse(msg.as_bytes()) {
            prop_assert_eq!(ev.devpath, path);
        }
    }

}

#[test]
fn matching_never_panics_on_garbage_sysfs() {
    use proptest::test_runner::{Config, TestRunner};
    let t = Tree::new();
    let pci_dir = t.sys.join("devices/pci0000:00/0000:00:05.0");
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = ("\\PC{0,24}", "[a-z0-9:][a-z0-9:.]{0,11}");
    runner
        .run(&strategy, |(dev_text, name)| {
            let _ = fs::remove_dir_all(&pci_dir);
            let blk = pci_dir.join("virtio2/block").join(&name);
            fs::create_dir_all(&blk).unwrap();
            fs::write(blk.join("dev"), &dev_text).unwrap();
            fs::create_dir_all(pci_dir.join("pci_bus").join(&name)).unwrap();
            let _ = sysfs::pci_block(&t.sys, &pci("05"));
            let _ = sysfs::pci_block(&t.sys, &pci("05/01"));
            let _ = sysfs::find(&t.sys, &Target::BlockName(name));
            Ok(())
        })
        .unwrap();
}
