//! Reference and attach counting, dedupe, addresses per kind, pending unplugs.
use std::path::Path;
use std::sync::Arc;

use capsule_devmgr::device::{BlockDriver, GuestAddress, ScsiAddr, VhostUserKind};
use capsule_devmgr::manager::{
    DetachOutcome, DeviceId, DeviceManager, DeviceStatus, ManagerConfig, ManagerError,
};
use capsule_devmgr::state::NullStore;
use capsule_devmgr::testing::ManagerTestExt;
use capsule_devmgr::testing::{check_consistency, devices, BackendOp, RecordingBackend};
use capsule_devmgr::Owner;

fn setup(driver: BlockDriver, pci: std::ops::Range<u32>) -> (DeviceManager, Arc<RecordingBackend>) {
    let backend = Arc::new(RecordingBackend::new());
    let mgr =
        DeviceManager::new(ManagerConfig::new(driver, pci), backend.clone(), NullStore).unwrap();
    (mgr, backend)
}

fn scsi() -> (DeviceManager, Arc<RecordingBackend>) {
    setup(BlockDriver::VirtioScsi, 1..32)
}

#[test]
fn dedupe_by_type_and_numbers_or_path() {
    let (mgr, _) = scsi();
    let a = mgr.add(devices::block(0)).unwrap();
    assert_eq!(mgr.add(devices::block(0)).unwrap(), a);
    assert_eq!(mgr.get(&a).unwrap().ref_count(), 2);
    // c 8:0 is not b 8:0.
    let c = mgr.add(devices::char_dev(8, 0)).unwrap();
    assert_ne!(c, a);
    // Devices without numbers: by kind and host path.
    let r1 = mgr.add(devices::runtime_block("/img/a")).unwrap();
    let r2 = mgr.add(devices::runtime_block("/img/b")).unwrap();
    assert_ne!(r1, r2);
    assert_eq!(mgr.add(devices::runtime_block("/img/a")).unwrap(), r1);
    let mut zero = devices::char_dev(0, 0);
    zero.host_path = "/dev/one".into();
    let mut zero2 = devices::char_dev(0, 0);
    zero2.host_path = "/dev/two".into();
    assert_ne!(mgr.add(zero).unwrap(), mgr.add(zero2).unwrap());
    assert_eq!(mgr.len(), 6);
}

#[tokio::test]
async fn every_users_request_is_kept() {
    let (mgr, _) = scsi();
    let first = devices::block(1);
    let mut second = devices::block(1);
    let second_info = second.info.as_mut().unwrap();
    second_info.container_path = "/dev/other".into();
    second_info.file_mode = Some(0o600);
    let id = mgr.add(first.clone()).unwrap();
    assert_eq!(mgr.add(second.clone()).unwrap(), id);
    let rec = mgr.get(&id).unwrap();
    let requests: Vec<_> = rec.uses.iter().map(|u| u.request.clone()).collect();
    assert_eq!(requests, vec![first.info.clone(), second.info.clone()]);
    assert!(rec.uses.iter().all(|u| u.owner == Owner::container("c")));
    assert_eq!(
        mgr.find_by_container_path(Path::new("/dev/other"))[0].id,
        id
    );
    assert_eq!(mgr.find_by_container_path(Path::new("/dev/xvd1"))[0].id, id);
    assert!(mgr
        .find_by_container_path(Path::new("/dev/nothing"))
        .is_empty());
    // Drop the first user's reference by name: the second's stays.
    assert_eq!(
        mgr.remove_request(&id, first.info.as_ref()).await.unwrap(),
        1
    );
    let uses = mgr.get(&id).unwrap().uses;
    assert_eq!(uses.len(), 1);
    assert_eq!(uses[0].request, second.info);
    assert!(mgr
        .find_by_container_path(Path::new("/dev/xvd1"))
        .is_empty());
    let e = mgr
        .remove_request(&id, first.info.as_ref())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("no reference of container c used as /dev/xvd1"),
        "{e}"
    );
    assert_eq!(mgr.remove(&id).await.unwrap(), 0);
    assert!(mgr.get(&id).is_none());
}

#[test]
fn conflicting_uses_are_refused_and_change_nothing() {
    let (mgr, _) = scsi();
    let id = mgr.add(devices::block(2)).unwrap();
    let before = mgr.snapshot();
    let mut ro = devices::block(2);
    ro.info.as_mut().unwrap().read_only = true;
    let e = mgr.add(ro).unwrap_err();
    assert!(matches!(e, ManagerError::Conflict { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("already used read-write")
            && msg.contains("dev0")
            && msg.contains("/dev/disk2"),
        "{msg}"
    );
    // Same numbers resolved as another kind.
    let mut other = devices::block(2);
    other.kind = capsule_devmgr::device::DeviceKind::Pmem;
    assert!(matches!(
        mgr.add(other).unwrap_err(),
        ManagerError::Conflict { .. }
    ));
    assert_eq!(mgr.snapshot(), before);
    assert_eq!(mgr.get(&id).unwrap().ref_count(), 1);
}

#[tokio::test]
async fn only_first_attach_and_last_detach_reach_the_backend() {
    let (mgr, backend) = scsi();
    let id = mgr.add(devices::block(0)).unwrap();
    mgr.add(devices::block(0)).unwrap();
    mgr.add(devices::block(0)).unwrap();
    let addr = mgr.attach(&id).await.unwrap();
    assert_eq!(addr, GuestAddress::Scsi(ScsiAddr { id: 0, lun: 0 }));
    assert_eq!(mgr.attach(&id).await.unwrap(), addr);
    assert_eq!(mgr.attach(&id).await.unwrap(), addr);
    // Never more attaches than references.
    let e = mgr.attach(&id).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("already attached 3 time(s) for 3 reference(s)"),
        "{e}"
    );
    assert_eq!(backend.ops(), [(BackendOp::Hotplug, "dev0".to_string())]);
    assert_eq!(
        mgr.detach(&id).await.unwrap(),
        DetachOutcome::StillAttached { attach_count: 2 }
    );
    assert_eq!(
        mgr.detach(&id).await.unwrap(),
        DetachOutcome::StillAttached { attach_count: 1 }
    );
    assert_eq!(backend.call_count(), 1);
    assert_eq!(mgr.detach(&id).await.unwrap(), DetachOutcome::Detached);
    assert_eq!(
        backend.ops(),
        [
            (BackendOp::Hotplug, "dev0".into()),
            (BackendOp::Unplug, "dev0".into())
        ]
    );
    let e = mgr.detach(&id).await.unwrap_err();
    assert!(e.to_string().contains("not attached"), "{e}");
    check_consistency(&mgr, &backend).unwrap();
}

#[tokio::test]
async fn removing_the_last_reference_of_an_attached_device_fails_and_changes_nothing() {
    let (mgr, backend) = scsi();
    let id = mgr.add(devices::block(0)).unwrap();
    mgr.attach(&id).await.unwrap();
    let before = mgr.snapshot();
    let e = mgr.remove(&id).await.unwrap_err();
    assert!(matches!(e, ManagerError::Refused { .. }));
    assert!(
        e.to_string().contains("detach first") && e.to_string().contains("dev0"),
        "{e}"
    );
    assert_eq!(mgr.snapshot(), before);
    // With two references and one attach, one reference may go.
    mgr.add(devices::block(0)).unwrap();
    assert_eq!(mgr.remove(&id).await.unwrap(), 1);
    assert!(mgr.remove(&id).await.is_err());
    assert_eq!(mgr.get(&id).unwrap().ref_count(), 1);
    assert_eq!(mgr.detach(&id).await.unwrap(), DetachOutcome::Detached);
    assert_eq!(mgr.remove(&id).await.unwrap(), 0);
    assert!(mgr.get(&id).is_none());
    assert!(matches!(
        mgr.remove(&id).await.unwrap_err(),
        ManagerError::UnknownDevice { .. }
    ));
    assert!(mgr.snapshot().allocators.block.is_empty());
    check_consistency(&mgr, &backend).unwrap();
}

#[tokio::test]
async fn generic_devices_are_counted_never_plugged() {
    let (mgr, backend) = scsi();
    let id = mgr.add(devices::char_dev(1, 3)).unwrap();
    mgr.add(devices::char_dev(1, 3)).unwrap();
    assert_eq!(mgr.attach(&id).await.unwrap(), GuestAddress::None);
    assert_eq!(mgr.coldplug(&id).await.unwrap(), GuestAddress::None);
    let rec = mgr.get(&id).unwrap();
    assert_eq!((rec.attach_count, rec.status), (2, DeviceStatus::Attached));
    assert!(rec.resources.is_empty());
    assert_eq!(
        mgr.detach(&id).await.unwrap(),
        DetachOutcome::StillAttached { attach_count: 1 }
    );
    assert_eq!(mgr.detach(&id).await.unwrap(), DetachOutcome::Detached);
    assert_eq!(backend.call_count(), 0);
    check_consistency(&mgr, &backend).unwrap();
}

#[tokio::test]
async fn addresses_follow_kind_and_driver() {
    // virtio-scsi: block index and SCSI address, no PCI slot, no vd name.
    let (mgr, backend) = scsi();
    for n in 0..3 {
        mgr.add(devices::block(n)).unwrap();
    }
    for n in 0..3 {
        mgr.attach(&DeviceId(n)).await.unwrap();
    }
    let req = &backend.calls()[2].request;
    assert_eq!(
        (req.block_index, req.scsi_addr),
        (Some(2), Some(ScsiAddr { id: 0, lun: 2 }))
    );
    assert_eq!(
        (
            req.drive_name.as_deref(),
            req.pci_slots.len(),
            req.pmem_index
        ),
        (None, 0, None)
    );
    assert_eq!(req.driver, Some(BlockDriver::VirtioScsi));

    // virtio-blk: block index, vd name and one PCI slot.
    let (mgr, backend) = setup(BlockDriver::VirtioBlk, 5..8);
    let id = mgr.add(devices::block(0)).unwrap();
    let addr = mgr.attach(&id).await.unwrap();
    assert_eq!(addr, GuestAddress::Pci("05".parse().unwrap()));
    let rec = mgr.get(&id).unwrap();
    assert_eq!(
        (
            rec.block_index(),
            rec.drive_name().as_deref(),
            rec.pci_slots()
        ),
        (Some(0), Some("vda"), &[5][..])
    );
    assert_eq!(rec.scsi_addr(), None);
    assert_eq!(
        backend.calls()[0].request.drive_name.as_deref(),
        Some("vda")
    );

    // nvdimm driver and pmem kind: a pmem index only, never a block index.
    let (mgr, backend) = setup(BlockDriver::Nvdimm, 1..32);
    let disk = mgr.add(devices::block(0)).unwrap();
    let file = mgr.add(devices::pmem(0)).unwrap();
    assert_eq!(mgr.coldplug(&disk).await.unwrap(), GuestAddress::Pmem(0));
    assert_eq!(mgr.attach(&file).await.unwrap(), GuestAddress::Pmem(1));
    let snap = mgr.snapshot();
    assert!(snap.allocators.block.is_empty());
    assert_eq!(snap.allocators.pmem.len(), 2);
    assert!(backend
        .calls()
        .iter()
        .all(|c| c.request.block_index.is_none() && c.request.drive_name.is_none()));

    // VFIO: one slot per function, mediated ones included; vhost-user.
    let (mgr, backend) = scsi();
    let gpu = mgr.add(devices::vfio(7, 2, 1)).unwrap();
    let blk = mgr.add(devices::vhost_user(VhostUserKind::Blk, 1)).unwrap();
    let vscsi = mgr
        .add(devices::vhost_user(VhostUserKind::Scsi, 2))
        .unwrap();
    let fs = mgr.add(devices::vhost_user(VhostUserKind::Fs, 3)).unwrap();
    let GuestAddress::Vfio(paths) = mgr.attach(&gpu).await.unwrap() else {
        panic!("vfio address")
    };
    assert_eq!(
        paths.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["01", "02", "03"]
    );
    assert_eq!(mgr.get(&gpu).unwrap().pci_slots(), [1, 2, 3]);
    mgr.attach(&blk).await.unwrap();
    mgr.attach(&vscsi).await.unwrap();
    mgr.attach(&fs).await.unwrap();
    let blk = mgr.get(&blk).unwrap();
    assert_eq!(
        (
            blk.block_index(),
            blk.drive_name().as_deref(),
            blk.pci_slots()
        ),
        (Some(0), Some("vda"), &[4][..])
    );
    let vscsi = mgr.get(&vscsi).unwrap();
    assert_eq!(
        (vscsi.block_index(), vscsi.scsi_addr(), vscsi.pci_slots()),
        (Some(1), None, &[5][..])
    );
    let fs = mgr.get(&fs).unwrap();
    assert_eq!((fs.block_index(), fs.pci_slots()), (None, &[6][..]));
    check_consistency(&mgr, &backend).unwrap();
}

#[tokio::test]
async fn addresses_are_freed_on_detach_and_reused_lowest_first() {
    let (mgr, backend) = setup(BlockDriver::VirtioBlk, 1..32);
    let ids: Vec<_> = (0..4)
        .map(|n| mgr.add(devices::block(n)).unwrap())
        .collect();
    for id in &ids {
        mgr.attach(id).await.unwrap();
    }
    mgr.detach(&ids[1]).await.unwrap();
    mgr.detach(&ids[2]).await.unwrap();
    let fresh = mgr.add(devices::block(9)).unwrap();
    mgr.attach(&fresh).await.unwrap();
    let rec = mgr.get(&fresh).unwrap();
    assert_eq!((rec.block_index(), rec.pci_slots()), (Some(1), &[2][..]));
    mgr.attach(&ids[1]).await.unwrap();
    assert_eq!(mgr.get(&ids[1]).unwrap().block_index(), Some(2));
    check_consistency(&mgr, &backend).unwrap();
}

#[tokio::test]
async fn pending_unplug_keeps_every_address() {
    let (mgr, backend) = setup(BlockDriver::VirtioBlk, 1..32);
    let id = mgr.add(devices::block(0)).unwrap();
    mgr.attach(&id).await.unwrap();
    let attached = mgr.get(&id).unwrap();
    backend.pend_unplugs_of("dev0");
    assert_eq!(mgr.detach(&id).await.unwrap(), DetachOutcome::Pending);
    let rec = mgr.get(&id).unwrap();
    assert_eq!(rec.status, DeviceStatus::UnplugPending);
    assert_eq!(
        (rec.attach_count, &rec.resources, &rec.guest_address),
        (1, &attached.resources, &attached.guest_address)
    );
    // Nobody else gets its index or slot.
    let other = mgr.add(devices::block(1)).unwrap();
    mgr.attach(&other).await.unwrap();
    assert_eq!(mgr.get(&other).unwrap().block_index(), Some(1));
    assert_eq!(mgr.get(&other).unwrap().pci_slots(), [2]);
    // Neither attach nor remove while pending.
    assert!(mgr
        .attach(&id)
        .await
        .unwrap_err()
        .to_string()
        .contains("unplug pending"));
    assert!(mgr.remove(&id).await.is_err());
    // A retry sends the unplug again.
    assert_eq!(mgr.detach(&id).await.unwrap(), DetachOutcome::Pending);
    backend.clear_pending();
    assert_eq!(mgr.detach(&id).await.unwrap(), DetachOutcome::Detached);
    let unplugs = backend
        .ops()
        .iter()
        .filter(|(op, d)| *op == BackendOp::Unplug && d == "dev0")
        .count();
    assert_eq!(unplugs, 3);
    assert!(mgr.get(&id).unwrap().resources.is_empty());
    check_consistency(&mgr, &backend).unwrap();
}

#[tokio::test]
async fn complete_pending_frees_when_the_guest_lets_go_later() {
    let (mgr, backend) = scsi();
    let id = mgr.add(devices::block(0)).unwrap();
    mgr.attach(&id).await.unwrap();
    assert!(mgr
        .complete_pending(&id)
        .await
        .unwrap_err()
        .to_string()
        .contains("not pending"));
    backend.pend_next_unplug();
    assert_eq!(mgr.detach(&id).await.unwrap(), DetachOutcome::Pending);
    mgr.complete_pending(&id).await.unwrap();
    let rec = mgr.get(&id).unwrap();
    assert_eq!(
        (rec.status, rec.attach_count, rec.resources.is_empty()),
        (DeviceStatus::Detached, 0, true)
    );
    assert!(mgr.snapshot().allocators.block.is_empty());
    assert_eq!(mgr.remove(&id).await.unwrap(), 0);
}

#[tokio::test]
async fn ids_are_never_reused_and_listed_in_numeric_order() {
    let (mgr, _) = scsi();
    let ids: Vec<_> = (0..12)
        .map(|n| mgr.add(devices::block(n)).unwrap())
        .collect();
    assert_eq!(ids[11].to_string(), "dev11");
    mgr.remove(&ids[11]).await.unwrap();
    assert_eq!(mgr.add(devices::block(50)).unwrap(), DeviceId(12));
    let listed: Vec<String> = mgr.list().iter().map(|r| r.id.to_string()).collect();
    assert_eq!(listed[9..], ["dev9", "dev10", "dev12"]);
}

#[tokio::test]
async fn exhaustion_names_the_space_and_takes_nothing() {
    let (mgr, backend) = setup(BlockDriver::VirtioScsi, 1..3);
    let gpu = mgr.add(devices::vfio(1, 3, 0)).unwrap();
    let e = mgr.attach(&gpu).await.unwrap_err();
    assert!(matches!(e, ManagerError::Exhausted { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("PCI slot space exhausted")
            && msg.contains("dev0")
            && msg.contains("/dev/vfio/1"),
        "{msg}"
    );
    assert!(mgr.snapshot().allocators.pci.is_empty());
    assert_eq!(mgr.get(&gpu).unwrap().status, DeviceStatus::Detached);
    assert_eq!(backend.call_count(), 0);
    // An empty VFIO group is refused up front.
    let e = mgr.add(devices::vfio(2, 0, 0)).unwrap_err();
    assert!(e.to_string().contains("no functions"), "{e}");
}

#[tokio::test]
async fn errors_name_the_device() {
    let (mgr, backend) = scsi();
    let e = mgr.attach(&DeviceId(99)).await.unwrap_err();
    assert_eq!(e.to_string(), "device dev99 not found");
    let id = mgr.add(devices::block(4)).unwrap();
    backend.fail_next();
    let e = mgr.attach(&id).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("dev0 (block /dev/disk4 as /dev/xvd4 (b 8:4))")
            && msg.contains("attach failed")
            && msg.contains("injected"),
        "{msg}"
    );
}
