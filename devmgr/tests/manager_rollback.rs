//! Failure at every step of attach, detach, new and remove rolls back
//! completely: addresses freed exactly once, counts intact, and the state
//! file equal to the manager's memory.
use std::path::Path;
use std::sync::Arc;

use capsule_devmgr::device::{BlockDriver, VhostUserKind};
use capsule_devmgr::manager::{
    DetachOutcome, DeviceId, DeviceManager, DeviceStatus, ManagerConfig, ManagerError,
};
use capsule_devmgr::state::{decode, FileStore, SandboxState, STATE_FILE};
use capsule_devmgr::testing::ManagerTestExt;
use capsule_devmgr::testing::{
    check_consistency, devices, BackendOp, FaultStep, FaultSwitch, FaultyIo, RecordingBackend,
};

struct Env {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    config: ManagerConfig,
    mgr: DeviceManager,
    backend: Arc<RecordingBackend>,
    faults: FaultSwitch,
}

fn env(driver: BlockDriver, pci: std::ops::Range<u32>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (io, faults) = FaultyIo::new();
    let store = FileStore::open_with_io(dir.path(), Box::new(io)).unwrap();
    let backend = Arc::new(RecordingBackend::new());
    let config = ManagerConfig::new(driver, pci);
    let mgr = DeviceManager::new(config.clone(), backend.clone(), store).unwrap();
    Env {
        path: dir.path().join(STATE_FILE),
        _dir: dir,
        config,
        mgr,
        backend,
        faults,
    }
}

impl Env {
    fn file_state(&self) -> SandboxState {
        decode(&std::fs::read(&self.path).unwrap(), &self.config).unwrap()
    }
    fn file_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
    /// File equals memory, invariants hold, the backend agrees.
    fn assert_consistent(&self) {
        assert_eq!(
            self.file_state(),
            self.mgr.snapshot(),
            "state file differs from memory"
        );
        check_consistency(&self.mgr, &self.backend).unwrap();
        assert!(
            !self.path.with_file_name("devices.json.tmp").exists(),
            "temp file left behind"
        );
    }
}

const STEPS: [FaultStep; 3] = [FaultStep::Write, FaultStep::Rename, FaultStep::SyncDir];

#[tokio::test]
async fn backend_hotplug_failure_rolls_back() {
    let e = env(BlockDriver::VirtioBlk, 1..32);
    let id = e.mgr.add(devices::block(0)).unwrap();
    let before = e.mgr.snapshot();
    e.backend.fail_on(BackendOp::Hotplug, Some("dev0"));
    let err = e.mgr.attach(&id).await.unwrap_err();
    assert!(matches!(err, ManagerError::Backend { .. }), "{err}");
    assert_eq!(e.mgr.snapshot(), before);
    e.assert_consistent();
    // Freed exactly once: the same index and slot are handed out again.
    e.backend.clear_failures();
    e.mgr.attach(&id).await.unwrap();
    let rec = e.mgr.get(&id).unwrap();
    assert_eq!((rec.block_index(), rec.pci_slots()), (Some(0), &[1][..]));
    let other = e.mgr.add(devices::block(1)).unwrap();
    e.mgr.attach(&other).await.unwrap();
    assert_eq!(e.mgr.get(&other).unwrap().block_index(), Some(1));
    e.assert_consistent();
}

#[tokio::test]
async fn coldplug_failure_rolls_back() {
    let e = env(BlockDriver::VirtioScsi, 1..32);
    let id = e.mgr.add(devices::block(0)).unwrap();
    let before = e.mgr.snapshot();
    e.backend.fail_next();
    assert!(e.mgr.coldplug(&id).await.is_err());
    assert_eq!(e.mgr.snapshot(), before);
    e.assert_consistent();
    assert_eq!(
        e.mgr.coldplug(&id).await.unwrap(),
        capsule_devmgr::device::GuestAddress::Scsi(capsule_devmgr::device::ScsiAddr {
            id: 0,
            lun: 0
        })
    );
    e.assert_consistent();
}

#[tokio::test]
async fn state_write_failure_before_the_backend_call_changes_nothing() {
    for step in STEPS {
        let e = env(BlockDriver::VirtioBlk, 1..32);
        let id = e.mgr.add(devices::vfio(3, 2, 0)).unwrap();
        let before = e.mgr.snapshot();
        let bytes = e.file_bytes();
        e.faults.fail_save(1, step);
        let err = e.mgr.attach(&id).await.unwrap_err();
        assert!(
            matches!(err, ManagerError::StateWrite { .. }),
            "{step:?}: {err}"
        );
        assert!(err.to_string().contains("nothing was attached"), "{err}");
        assert_eq!(e.backend.call_count(), 0, "{step:?}");
        assert_eq!(e.mgr.snapshot(), before, "{step:?}");
        assert_eq!(e.file_bytes(), bytes, "{step:?}");
        e.assert_consistent();
    }
}

#[tokio::test]
async fn state_write_failure_after_the_backend_call_unplugs_again() {
    for step in STEPS {
        let e = env(BlockDriver::VirtioScsi, 1..32);
        let id = e
            .mgr
            .add(devices::vhost_user(VhostUserKind::Blk, 0))
            .unwrap();
        let before = e.mgr.snapshot();
        e.faults.fail_save(2, step);
        let err = e.mgr.attach(&id).await.unwrap_err();
        assert!(
            matches!(err, ManagerError::StateWrite { .. }),
            "{step:?}: {err}"
        );
        assert!(err.to_string().contains("unplugged again"), "{err}");
        assert_eq!(
            e.backend.ops(),
            [
                (BackendOp::Hotplug, "dev0".into()),
                (BackendOp::Unplug, "dev0".into())
            ]
        );
        assert_eq!(e.mgr.snapshot(), before, "{step:?}");
        e.assert_consistent();
    }
}

#[tokio::test]
async fn undo_unplug_that_does_not_complete_leaves_the_device_pending() {
    let e = env(BlockDriver::VirtioBlk, 1..32);
    let id = e.mgr.add(devices::block(0)).unwrap();
    e.faults.fail_save(2, FaultStep::Write);
    e.backend.pend_next_unplug();
    let err = e.mgr.attach(&id).await.unwrap_err();
    assert!(err.to_string().contains("left unplug-pending"), "{err}");
    let rec = e.mgr.get(&id).unwrap();
    assert_eq!(
        (rec.status, rec.attach_count),
        (DeviceStatus::UnplugPending, 1)
    );
    assert_eq!((rec.block_index(), rec.pci_slots()), (Some(0), &[1][..]));
    e.assert_consistent();
    assert_eq!(e.mgr.detach(&id).await.unwrap(), DetachOutcome::Detached);
    e.assert_consistent();

    // The undo unplug failing outright: pending as well.
    e.faults.fail_save(2, FaultStep::Write);
    e.backend.fail_on(BackendOp::Unplug, None);
    let err = e.mgr.attach(&id).await.unwrap_err();
    assert!(
        err.to_string().contains("unplugging it again failed"),
        "{err}"
    );
    assert_eq!(e.mgr.get(&id).unwrap().status, DeviceStatus::UnplugPending);
    e.assert_consistent();
}

#[tokio::test]
async fn allocator_exhaustion_rolls_back_what_was_taken() {
    // vhost-user-blk takes a block index, then finds no PCI slot.
    let e = env(BlockDriver::VirtioScsi, 1..1);
    let id = e
        .mgr
        .add(devices::vhost_user(VhostUserKind::Blk, 0))
        .unwrap();
    let before = e.mgr.snapshot();
    let err = e.mgr.attach(&id).await.unwrap_err();
    assert!(
        err.to_string().contains("PCI slot space exhausted"),
        "{err}"
    );
    assert_eq!(e.mgr.snapshot(), before);
    assert!(before.allocators.block.is_empty());
    assert_eq!(e.backend.call_count(), 0);
    e.assert_consistent();

    // pmem exhaustion after others took every index.
    let e = env(BlockDriver::Nvdimm, 1..32);
    let ids: Vec<_> = (0..5)
        .map(|n| e.mgr.add(devices::pmem(n)).unwrap())
        .collect();
    for id in &ids[..4] {
        e.mgr.attach(id).await.unwrap();
    }
    let err = e.mgr.attach(&ids[4]).await.unwrap_err();
    assert!(
        err.to_string().contains("pmem index space exhausted"),
        "{err}"
    );
    assert_eq!(e.mgr.get(&ids[4]).unwrap().status, DeviceStatus::Detached);
    e.assert_consistent();
}

#[tokio::test]
async fn detach_backend_failure_keeps_the_device_attached() {
    let e = env(BlockDriver::VirtioBlk, 1..32);
    let id = e.mgr.add(devices::block(0)).unwrap();
    e.mgr.attach(&id).await.unwrap();
    let attached = e.mgr.snapshot();
    e.backend.fail_on(BackendOp::Unplug, Some("dev0"));
    let err = e.mgr.detach(&id).await.unwrap_err();
    assert!(matches!(err, ManagerError::Backend { .. }), "{err}");
    assert_eq!(e.mgr.snapshot(), attached);
    e.assert_consistent();
    e.backend.clear_failures();
    assert_eq!(e.mgr.detach(&id).await.unwrap(), DetachOutcome::Detached);
    e.assert_consistent();
}

#[tokio::test]
async fn detach_state_write_failure_before_the_unplug_changes_nothing() {
    for step in STEPS {
        let e = env(BlockDriver::VirtioBlk, 1..32);
        let id = e.mgr.add(devices::block(0)).unwrap();
        e.mgr.attach(&id).await.unwrap();
        let attached = e.mgr.snapshot();
        e.faults.fail_save(1, step);
        assert!(matches!(
            e.mgr.detach(&id).await.unwrap_err(),
            ManagerError::StateWrite { .. }
        ));
        assert_eq!(e.backend.ops().len(), 1, "no unplug was sent");
        assert_eq!(e.mgr.snapshot(), attached);
        e.assert_consistent();
    }
}

#[tokio::test]
async fn detach_state_write_failure_after_the_unplug_keeps_the_truth() {
    let e = env(BlockDriver::VirtioBlk, 1..32);
    let id = e.mgr.add(devices::block(0)).unwrap();
    e.mgr.attach(&id).await.unwrap();
    // One failure is retried away.
    e.faults.fail_save(2, FaultStep::Write);
    assert_eq!(e.mgr.detach(&id).await.unwrap(), DetachOutcome::Detached);
    e.assert_consistent();
    // Two are reported; memory says detached (it is), the file still shows
    // the unplug in flight with its addresses held, never less.
    e.mgr.attach(&id).await.unwrap();
    e.faults.fail_save(2, FaultStep::Write);
    e.faults.fail_save(3, FaultStep::Write);
    let err = e.mgr.detach(&id).await.unwrap_err();
    assert!(
        err.to_string().contains("the device was unplugged"),
        "{err}"
    );
    assert_eq!(e.mgr.get(&id).unwrap().status, DeviceStatus::Detached);
    let file = e.file_state();
    assert_eq!(file.devices[&id].status, DeviceStatus::Detaching);
    assert_eq!(file.devices[&id].block_index(), Some(0));
    e.mgr.persist().unwrap();
    e.assert_consistent();
}

#[tokio::test]
async fn pending_unplug_state_is_saved() {
    let e = env(BlockDriver::VirtioScsi, 1..32);
    let id = e.mgr.add(devices::block(0)).unwrap();
    e.mgr.attach(&id).await.unwrap();
    e.backend.pend_unplugs_of("dev0");
    assert_eq!(e.mgr.detach(&id).await.unwrap(), DetachOutcome::Pending);
    assert_eq!(
        e.file_state().devices[&id].status,
        DeviceStatus::UnplugPending
    );
    e.assert_consistent();
    // complete_pending with a failed write stays pending everywhere.
    e.faults.fail_save(1, FaultStep::Rename);
    assert!(e.mgr.complete_pending(&id).await.is_err());
    assert_eq!(e.mgr.get(&id).unwrap().status, DeviceStatus::UnplugPending);
    e.assert_consistent();
    e.mgr.complete_pending(&id).await.unwrap();
    // The fake VM never saw the unplug finish, so only compare with the file.
    assert_eq!(e.file_state(), e.mgr.snapshot());
    assert!(e.mgr.snapshot().allocators.block.is_empty());
}

#[tokio::test]
async fn new_and_remove_write_failures_change_nothing() {
    for step in STEPS {
        let e = env(BlockDriver::VirtioScsi, 1..32);
        e.faults.fail_save(1, step);
        assert!(matches!(
            e.mgr.add(devices::block(0)).unwrap_err(),
            ManagerError::StateWrite { .. }
        ));
        assert!(e.mgr.is_empty());
        e.assert_consistent();
        let id = e.mgr.add(devices::block(0)).unwrap();
        assert_eq!(id, DeviceId(0), "the id of a failed create is not burnt");
        e.faults.fail_save(1, step);
        assert!(e.mgr.add(devices::block(0)).is_err());
        assert_eq!(e.mgr.get(&id).unwrap().ref_count(), 1);
        e.assert_consistent();
        e.mgr.attach(&id).await.unwrap();
        e.faults.fail_save(1, step);
        assert!(e.mgr.detach(&id).await.is_err());
        e.mgr.add(devices::block(0)).unwrap();
        e.faults.fail_save(1, step);
        assert!(
            e.mgr.attach(&id).await.is_err(),
            "second attach count not saved"
        );
        assert_eq!(e.mgr.get(&id).unwrap().attach_count, 1);
        e.faults.fail_save(1, step);
        assert!(e.mgr.remove(&id).await.is_err());
        assert_eq!(e.mgr.get(&id).unwrap().ref_count(), 2);
        e.assert_consistent();
        e.mgr.detach(&id).await.unwrap();
        e.mgr.remove(&id).await.unwrap();
        e.faults.fail_save(1, step);
        let before = e.mgr.snapshot();
        assert!(e.mgr.remove(&id).await.is_err());
        assert_eq!(e.mgr.snapshot(), before, "last reference kept");
        e.assert_consistent();
        assert_eq!(e.mgr.remove(&id).await.unwrap(), 0);
        e.assert_consistent();
        // The record and its dedupe entry are gone for real.
        assert_eq!(e.mgr.add(devices::block(0)).unwrap(), DeviceId(1));
        assert!(Path::new(&e.path).exists());
    }
}
