//! Device manager costs.
//!
//! * `lifecycle/<n>`: new + attach + detach + remove of one device with `n`
//!   devices already attached (quiet recording backend, no-op store). The
//!   per-operation cost must not grow with `n`.
//! * `state_write/100`: one persisted `FileStore` write (encode, write, fsync,
//!   rename, directory fsync) of a sandbox with 100 devices, and `encode/100`
//!   the serialisation alone.
use std::hint::black_box;
use std::sync::Arc;

use capsule_devmgr::device::{BlockDriver, DevType, DeviceKind, HostDevice};
use capsule_devmgr::manager::{DeviceManager, ManagerConfig};
use capsule_devmgr::state::{encode, FileStore, NullStore, StateStore};
use capsule_devmgr::testing::ManagerTestExt;
use capsule_devmgr::testing::{devices, RecordingBackend};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};

fn device(n: u32) -> HostDevice {
    HostDevice {
        info: Some(devices::info(
            DevType::Block,
            8 + n / (1 << 20),
            n % (1 << 20),
            "/dev/xvdz",
        )),
        host_path: "/dev/bench".into(),
        kind: DeviceKind::Block,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime")
}

fn populated(rt: &tokio::runtime::Runtime, n: u32) -> DeviceManager {
    let config = ManagerConfig::new(BlockDriver::VirtioScsi, 1..32);
    let mgr = DeviceManager::new(config, Arc::new(RecordingBackend::quiet()), NullStore)
        .expect("manager");
    rt.block_on(async {
        for i in 0..n {
            let id = mgr.add(device(i)).expect("new");
            mgr.attach(&id).await.expect("attach");
        }
    });
    mgr
}

fn lifecycle(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("lifecycle");
    for n in [100u32, 1_000, 10_000] {
        let mgr = populated(&rt, n);
        let mut next = n;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_batched(
                || {
                    next += 1;
                    device(next)
                },
                |dev| {
                    rt.block_on(async {
                        let id = mgr.add(dev).expect("new");
                        black_box(mgr.attach(&id).await.expect("attach"));
                        black_box(mgr.detach(&id).await.expect("detach"));
                        mgr.remove(&id).await.expect("remove");
                    })
                },
                BatchSize::SmallInput,
            )
        });
        assert_eq!(mgr.len(), n as usize);
    }
    group.finish();
}

fn state_write(c: &mut Criterion) {
    let rt = runtime();
    let state = populated(&rt, 100).snapshot();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = FileStore::open(dir.path()).expect("store");
    c.bench_function("encode/100", |b| {
        b.iter(|| black_box(encode(&state).expect("encode")))
    });
    c.bench_function("state_write/100", |b| {
        b.iter(|| store.save(&state).expect("save"))
    });
}

criterion_group!(benches, lifecycle, state_write);
criterion_main!(benches);
