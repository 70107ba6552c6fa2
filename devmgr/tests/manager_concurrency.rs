//! Many tasks on one manager: no lock across backend calls, one device's
//! operations serialised, others concurrent.
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsule_devmgr::device::BlockDriver;
use capsule_devmgr::manager::{
    DetachOutcome, DeviceId, DeviceManager, DeviceStatus, ManagerConfig,
};
use capsule_devmgr::state::{FileStore, NullStore};
use capsule_devmgr::testing::ManagerTestExt;
use capsule_devmgr::testing::{check_consistency, devices, BackendOp, RecordingBackend};

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn manager_is_send_and_sync() {
    assert_send_sync::<DeviceManager>();
}

async fn wait_for_call(backend: &RecordingBackend, op: BackendOp, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !backend.ops().iter().any(|(o, i)| *o == op && i == id) {
        assert!(
            Instant::now() < deadline,
            "{op:?} {id} never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_call_on_one_device_does_not_block_another() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(RecordingBackend::new());
    let config = ManagerConfig::new(BlockDriver::VirtioBlk, 1..32);
    let mgr = Arc::new(
        DeviceManager::new(
            config,
            backend.clone(),
            FileStore::open(dir.path()).unwrap(),
        )
        .unwrap(),
    );
    let a = mgr.add(devices::block(0)).unwrap();
    mgr.add(devices::block(0)).unwrap();
    let b = mgr.add(devices::block(1)).unwrap();
    backend.set_delay(
        Some(BackendOp::Hotplug),
        Some("dev0"),
        Duration::from_secs(3),
    );

    let slow = tokio::spawn({
        let mgr = mgr.clone();
        async move { mgr.attach(&a).await }
    });
    wait_for_call(&backend, BackendOp::Hotplug, "dev0").await;
    // A second operation on A waits for the first.
    let queued = tokio::spawn({
        let mgr = mgr.clone();
        async move { mgr.attach(&a).await }
    });

    // Meanwhile B goes through a whole life cycle, and lookups answer.
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(1), async {
        mgr.attach(&b).await.unwrap();
        assert_eq!(mgr.detach(&b).await.unwrap(), DetachOutcome::Detached);
        let c = mgr.add(devices::block(2)).unwrap();
        mgr.attach(&c).await.unwrap();
        mgr.detach(&c).await.unwrap();
        mgr.remove(&c).await.unwrap();
        mgr.remove(&b).await.unwrap();
        assert_eq!(mgr.get(&a).unwrap().status, DeviceStatus::Attaching);
        assert_eq!(mgr.list().len(), 1);
    })
    .await
    .expect("operations on B were blocked by A's backend call");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!slow.is_finished(), "A's hotplug should still be sleeping");
    assert!(
        !queued.is_finished(),
        "the second attach of A must wait for the first"
    );

    let addr = slow.await.unwrap().unwrap();
    assert_eq!(queued.await.unwrap().unwrap(), addr);
    let rec = mgr.get(&a).unwrap();
    assert_eq!((rec.status, rec.attach_count), (DeviceStatus::Attached, 2));
    let hotplugs_of_a = backend
        .ops()
        .iter()
        .filter(|(o, i)| *o == BackendOp::Hotplug && i == "dev0")
        .count();
    assert_eq!(hotplugs_of_a, 1);
    check_consistency(&mgr, &backend).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_on_shared_and_separate_devices() {
    const DEVICES: u32 = 8;
    const USERS: u32 = 8;
    let backend = Arc::new(RecordingBackend::new());
    backend.set_delay(None, None, Duration::from_millis(3));
    let config = ManagerConfig::new(BlockDriver::VirtioBlk, 1..32);
    let mgr = Arc::new(DeviceManager::new(config, backend.clone(), NullStore).unwrap());

    // Phase 1: every user references, attaches and holds; then all detach.
    let barrier = Arc::new(tokio::sync::Barrier::new((DEVICES * USERS) as usize));
    let mut tasks = Vec::new();
    for d in 0..DEVICES {
        for _ in 0..USERS {
            let (mgr, barrier) = (mgr.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let id = mgr.add(devices::block(d)).unwrap();
                let addr = mgr.attach(&id).await.unwrap();
                barrier.wait().await;
                mgr.detach(&id).await.unwrap();
                (id, addr)
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    for d in 0..DEVICES {
        let id = DeviceId(u64::from(d));
        let addrs: Vec<_> = results
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, a)| a)
            .collect();
        assert_eq!(addrs.len(), USERS as usize);
        assert!(
            addrs.windows(2).all(|w| w[0] == w[1]),
            "every user of {id} sees one address"
        );
        let ops: Vec<_> = backend
            .ops()
            .into_iter()
            .filter(|(_, i)| *i == id.to_string())
            .map(|(o, _)| o)
            .collect();
        assert_eq!(ops, [BackendOp::Hotplug, BackendOp::Unplug], "{id}");
        let rec = mgr.get(&id).unwrap();
        assert_eq!(
            (rec.ref_count(), rec.attach_count, rec.status),
            (USERS, 0, DeviceStatus::Detached)
        );
    }
    check_consistency(&mgr, &backend).unwrap();

    // Phase 2: churn without a barrier; per device, plugs and unplugs
    // alternate and everything ends detached and free.
    backend.clear_calls();
    let mut tasks = Vec::new();
    for n in 0..(DEVICES * USERS) {
        let mgr = mgr.clone();
        tasks.push(tokio::spawn(async move {
            let id = DeviceId(u64::from(n % DEVICES));
            for round in 0..3 {
                mgr.attach(&id).await.unwrap();
                if (n + round) % 3 == 0 {
                    tokio::task::yield_now().await;
                }
                mgr.detach(&id).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for d in 0..DEVICES {
        let id = format!("dev{d}");
        let ops: Vec<_> = backend
            .ops()
            .into_iter()
            .filter(|(_, i)| *i == id)
            .map(|(o, _)| o)
            .collect();
        assert!(!ops.is_empty());
        for (i, op) in ops.iter().enumerate() {
            let want = if i % 2 == 0 {
                BackendOp::Hotplug
            } else {
                BackendOp::Unplug
            };
            assert_eq!(*op, want, "{id}: {ops:?}");
        }
    }
    let snap = mgr.snapshot();
    assert!(snap.allocators.block.is_empty() && snap.allocators.pci.is_empty());
    check_consistency(&mgr, &backend).unwrap();
    for d in 0..DEVICES {
        for _ in 0..USERS {
            mgr.remove(&DeviceId(u64::from(d))).await.unwrap();
        }
    }
    assert!(mgr.is_empty());
}
