//! Random sequences of operations with random backend and state-write
//! failures: after every step the invariants hold, the state file equals
//! memory, and at the end the file reloads to an identical manager.
use std::collections::BTreeMap;
use std::sync::Arc;

use capsule_devmgr::device::{BlockDriver, HostDevice, VhostUserKind};
use capsule_devmgr::manager::{
    DetachOutcome, DeviceId, DeviceManager, DeviceStatus, ManagerConfig,
};
use capsule_devmgr::state::{decode, FileStore, STATE_FILE};
use capsule_devmgr::testing::ManagerTestExt;
use capsule_devmgr::testing::{check_consistency, devices, FaultStep, FaultyIo, RecordingBackend};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    New(usize),
    Attach(usize),
    Coldplug(usize),
    Detach(usize),
    Remove(usize),
    Complete(usize),
    FailNextBackendCall,
    PendNextUnplug,
    FailSave(u64, FaultStep),
}

fn pool() -> Vec<HostDevice> {
    let mut other_user = devices::block(0);
    other_user.info.as_mut().unwrap().container_path = "/dev/other".into();
    vec![
        devices::block(0),
        devices::block(1),
        other_user,
        devices::char_dev(8, 0),
        devices::vfio(1, 2, 1),
        devices::vhost_user(VhostUserKind::Blk, 0),
        devices::vhost_user(VhostUserKind::Fs, 1),
        devices::pmem(0),
        devices::runtime_block("/img/rootfs"),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let step = prop_oneof![
        Just(FaultStep::Write),
        Just(FaultStep::Rename),
        Just(FaultStep::SyncDir)
    ];
    prop_oneof![
        4 => (0..9usize).prop_map(Op::New),
        4 => (0..12usize).prop_map(Op::Attach),
        1 => (0..12usize).prop_map(Op::Coldplug),
        4 => (0..12usize).prop_map(Op::Detach),
        3 => (0..12usize).prop_map(Op::Remove),
        1 => (0..12usize).prop_map(Op::Complete),
        1 => Just(Op::FailNextBackendCall),
        1 => Just(Op::PendNextUnplug),
        1 => (1..4u64, step).prop_map(|(n, s)| Op::FailSave(n, s)),
    ]
}

fn driver() -> impl Strategy<Value = BlockDriver> {
    prop_oneof![
        Just(BlockDriver::VirtioScsi),
        Just(BlockDriver::VirtioBlk),
        Just(BlockDriver::Nvdimm),
    ]
}

/// The id an op aims at: an existing device, or now and then a missing one.
fn target(mgr: &DeviceManager, k: usize) -> DeviceId {
    let list = mgr.list();
    if list.is_empty() || k >= 10 {
        DeviceId(1000 + k as u64)
    } else {
        list[k % list.len()].id
    }
}

async fn run(driver: BlockDriver, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ManagerConfig::new(driver, 1..6);
    config.pmem_slots = 0..2;
    let (io, faults) = FaultyIo::new();
    let backend = Arc::new(RecordingBackend::new());
    let mgr = DeviceManager::new(
        config.clone(),
        backend.clone(),
        FileStore::open_with_io(dir.path(), Box::new(io)).unwrap(),
    )
    .unwrap();
    let pool = pool();
    // Reference counts as the callers see them.
    let mut refs: BTreeMap<DeviceId, u32> = BTreeMap::new();

    for (step, op) in ops.into_iter().enumerate() {
        let before = mgr.snapshot();
        let ctx = format!("step {step}: {op:?}");
        // Ok(Some(id)) names the device the op changed; errors must change nothing.
        let outcome: Result<Option<DeviceId>, String> = match op {
            Op::New(i) => mgr
                .add(pool[i].clone())
                .map(|id| {
                    *refs.entry(id).or_default() += 1;
                    Some(id)
                })
                .map_err(|e| e.to_string()),
            Op::Attach(k) | Op::Coldplug(k) => {
                let id = target(&mgr, k);
                let res = if matches!(op, Op::Attach(_)) {
                    mgr.attach(&id).await
                } else {
                    mgr.coldplug(&id).await
                };
                match res {
                    Ok(_) => {
                        let (b, a) = (&before.devices[&id], mgr.get(&id).unwrap());
                        prop_assert_eq!(a.attach_count, b.attach_count + 1, "{}", ctx);
                        Ok(Some(id))
                    }
                    Err(e) => {
                        // The one error that changes state: the hypervisor kept
                        // a device the manager could not record, and the undo
                        // did not finish.
                        if mgr
                            .get(&id)
                            .is_some_and(|r| r.status == DeviceStatus::UnplugPending)
                            && before.devices[&id].status == DeviceStatus::Detached
                        {
                            Ok(Some(id))
                        } else {
                            Err(e.to_string())
                        }
                    }
                }
            }
            Op::Detach(k) => {
                let id = target(&mgr, k);
                match mgr.detach(&id).await {
                    Ok(outcome) => {
                        let a = mgr.get(&id).unwrap();
                        match outcome {
                            DetachOutcome::Detached => {
                                prop_assert_eq!(a.status, DeviceStatus::Detached)
                            }
                            DetachOutcome::StillAttached { attach_count } => {
                                prop_assert_eq!(attach_count, a.attach_count);
                                prop_assert_eq!(attach_count + 1, before.devices[&id].attach_count);
                            }
                            DetachOutcome::Pending => {
                                prop_assert_eq!(a.status, DeviceStatus::UnplugPending);
                                prop_assert_eq!(
                                    &a.resources,
                                    &before.devices[&id].resources,
                                    "{}",
                                    ctx
                                );
                            }
                        }
                        Ok(Some(id))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Op::Remove(k) => {
                let id = target(&mgr, k);
                match mgr.remove(&id).await {
                    Ok(left) => {
                        let r = refs.get_mut(&id).unwrap();
                        *r -= 1;
                        prop_assert_eq!(left, *r);
                        if left == 0 {
                            refs.remove(&id);
                        }
                        Ok(Some(id))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Op::Complete(k) => {
                let id = target(&mgr, k);
                match mgr.complete_pending(&id).await {
                    Ok(()) => {
                        backend.complete_unplug(&id.to_string());
                        Ok(Some(id))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Op::FailNextBackendCall => {
                backend.fail_next();
                Ok(None)
            }
            Op::PendNextUnplug => {
                backend.pend_next_unplug();
                Ok(None)
            }
            Op::FailSave(n, s) => {
                // One armed write failure at a time: a retry or a rewrite of
                // the previous state then always succeeds.
                faults.clear();
                faults.fail_save(n, s);
                Ok(None)
            }
        };
        let after = mgr.snapshot();
        if let Err(e) = &outcome {
            prop_assert_eq!(
                &after,
                &before,
                "{} failed ({}) but changed the state",
                ctx,
                e
            );
            prop_assert!(
                e.contains("dev"),
                "{}: error does not name the device: {}",
                ctx,
                e
            );
        }
        if let Err(e) = check_consistency(&mgr, &backend) {
            return Err(TestCaseError::fail(format!("{ctx}: {e}")));
        }
        let counted: BTreeMap<DeviceId, u32> = after
            .devices
            .values()
            .map(|r| (r.id, r.ref_count()))
            .collect();
        prop_assert_eq!(&counted, &refs, "{}", ctx);
        let file = decode(
            &std::fs::read(dir.path().join(STATE_FILE)).unwrap(),
            &config,
        )
        .map_err(|e| TestCaseError::fail(format!("{ctx}: state file: {e}")))?;
        prop_assert_eq!(&file, &after, "{}: state file differs from memory", ctx);
    }

    // Reload: the same manager.
    let live = mgr.snapshot();
    let listed = mgr.list();
    drop(mgr);
    let store = FileStore::open(dir.path()).unwrap();
    let loaded = DeviceManager::load(config, backend.clone(), store).unwrap();
    prop_assert_eq!(&loaded.snapshot(), &live);
    prop_assert_eq!(loaded.list(), listed);
    // ... which keeps working: every device can be detached and removed.
    backend.clear_failures();
    backend.clear_pending();
    faults.clear();
    for rec in loaded.list() {
        while loaded.get(&rec.id).is_some_and(|r| r.attach_count > 0) {
            loaded.detach(&rec.id).await.unwrap();
        }
        for _ in 0..rec.ref_count() {
            loaded.remove(&rec.id).await.unwrap();
        }
    }
    prop_assert!(loaded.is_empty());
    let snap = loaded.snapshot();
    prop_assert!(
        snap.allocators.block.is_empty()
            && snap.allocators.pci.is_empty()
            && snap.allocators.pmem.is_empty()
    );
    check_consistency(&loaded, &backend).map_err(TestCaseError::fail)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_every_invariant(driver in driver(), ops in proptest::collection::vec(op(), 1..50)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(run(driver, ops))?;
    }
}
