//! The state file: round trip, refusal of damaged files (left untouched),
//! the lock, stale temp files and write faults.
use std::path::Path;
use std::sync::Arc;

use capsule_devmgr::device::{BlockDriver, VhostUserKind};
use capsule_devmgr::manager::{DeviceId, DeviceManager, DeviceStatus, ManagerConfig, ManagerError};
use capsule_devmgr::state::{
    decode, encode, FileStore, NullStore, SandboxState, StateError, StateStore, STATE_FILE,
    TEMP_FILE,
};
use capsule_devmgr::testing::ManagerTestExt;
use capsule_devmgr::testing::{devices, FaultStep, FaultyIo, RecordingBackend};
use serde_json::{json, Value};

fn config() -> ManagerConfig {
    ManagerConfig::new(BlockDriver::VirtioScsi, 1..32)
}

/// A sandbox with one of everything, left in `dir`; returns its snapshot.
async fn populate(dir: &Path) -> SandboxState {
    let backend = Arc::new(RecordingBackend::new());
    let mgr = DeviceManager::new(config(), backend.clone(), FileStore::open(dir).unwrap()).unwrap();
    let scsi = mgr.add(devices::block(0)).unwrap();
    let mut ro = devices::block(1);
    ro.info.as_mut().unwrap().read_only = true;
    let ro = mgr.add(ro).unwrap();
    let gpu = mgr.add(devices::vfio(4, 2, 1)).unwrap();
    let fs = mgr.add(devices::vhost_user(VhostUserKind::Fs, 1)).unwrap();
    let pmem = mgr.add(devices::pmem(0)).unwrap();
    let tty = mgr.add(devices::char_dev(4, 1)).unwrap();
    let pending = mgr.add(devices::vhost_user(VhostUserKind::Blk, 2)).unwrap();
    let idle = mgr.add(devices::runtime_block("/img/idle")).unwrap();
    mgr.add(devices::block(0)).unwrap();
    for id in [scsi, scsi, ro, gpu, fs, pmem, tty, pending] {
        mgr.attach(&id).await.unwrap();
    }
    backend.pend_next_unplug();
    mgr.detach(&pending).await.unwrap();
    mgr.remove(&idle).await.unwrap();
    assert_eq!(
        mgr.get(&pending).unwrap().status,
        DeviceStatus::UnplugPending
    );
    mgr.snapshot()
}

fn load(dir: &Path) -> Result<DeviceManager, ManagerError> {
    let store = FileStore::open(dir).unwrap();
    DeviceManager::load(config(), Arc::new(RecordingBackend::new()), store)
}

#[tokio::test]
async fn round_trip_reproduces_the_manager() {
    let dir = tempfile::tempdir().unwrap();
    let live = populate(dir.path()).await;
    let bytes = std::fs::read(dir.path().join(STATE_FILE)).unwrap();
    let loaded = load(dir.path()).unwrap();
    assert_eq!(loaded.snapshot(), live);
    assert_eq!(
        std::fs::read(dir.path().join(STATE_FILE)).unwrap(),
        bytes,
        "load wrote nothing"
    );
    assert_eq!(encode(&live).unwrap(), bytes, "encoding is deterministic");

    // Human-readable text forms, nothing dropped.
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["version"], 2);
    assert_eq!(v["next_id"], 8);
    let devs = v["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 7);
    assert_eq!(devs[0]["id"], "dev0");
    assert_eq!(
        devs[0]["guest_address"],
        json!({"type": "scsi", "address": "0:0"})
    );
    assert_eq!(devs[0]["uses"].as_array().unwrap().len(), 2);
    assert_eq!(devs[0]["uses"][0]["request"]["container_path"], "/dev/xvd0");
    assert_eq!(
        devs[0]["uses"][0]["owner"],
        json!({"owner": "container", "name": "c"})
    );
    assert_eq!(devs[1]["uses"][0]["request"]["read_only"], true);
    assert_eq!(
        devs[2]["guest_address"],
        json!({"type": "vfio", "address": ["01", "02", "03"]})
    );
    assert_eq!(devs[2]["resources"]["pci_slots"], json!([1, 2, 3]));
    assert_eq!(devs[3]["kind"]["kind"], "vhost-user");
    assert_eq!(devs[3]["kind"]["vhost"], "fs");
    assert_eq!(devs[3]["kind"]["tag"], "share1");
    assert_eq!(devs[4]["resources"]["pmem_index"], 0);
    assert_eq!(devs[6]["status"], "unplug-pending");
    assert_eq!(v["allocators"]["block"]["held"], json!([0, 1, 2]));

    // The loaded manager carries on where the old one stopped.
    let id = loaded.add(devices::block(7)).unwrap();
    assert_eq!(id, DeviceId(8));
    loaded.attach(&id).await.unwrap();
    assert_eq!(loaded.get(&id).unwrap().block_index(), Some(3));
    // The dedupe index was rebuilt.
    assert_eq!(loaded.add(devices::block(0)).unwrap(), DeviceId(0));
    assert_eq!(loaded.get(&DeviceId(0)).unwrap().ref_count(), 3);
}

/// Loading `bytes` must fail with a message containing `want`, and leave the
/// file exactly as it was, with no temp file.
fn assert_refused(bytes: &[u8], want: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    std::fs::write(&path, bytes).unwrap();
    let e = load(dir.path()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ManagerError::Load { .. }), "{msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "names the file: {msg}"
    );
    assert!(msg.contains(want), "expected {want:?} in: {msg}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "file changed");
    assert!(!dir.path().join(TEMP_FILE).exists());
}

async fn good_state() -> (Vec<u8>, Value) {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path()).await;
    let bytes = std::fs::read(dir.path().join(STATE_FILE)).unwrap();
    let v = serde_json::from_slice(&bytes).unwrap();
    (bytes, v)
}

type Edit = Box<dyn Fn(&mut Value)>;

fn edited(v: &Value, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = v.clone();
    edit(&mut v);
    serde_json::to_vec(&v).unwrap()
}

#[tokio::test]
async fn truncated_and_garbage_files_are_refused_untouched() {
    let (bytes, _) = good_state().await;
    let len = bytes.len();
    for cut in [0, 1, 2, 10, len / 4, len / 2, len * 3 / 4, len - 3, len - 2] {
        assert_refused(&bytes[..cut], "truncated file");
    }
    assert_refused(b"\x00\xff\xfe garbage", "not valid device state");
    assert_refused(b"null", "expected a JSON object");
    assert_refused(b"[]", "expected a JSON object");
    assert_refused(b"{}", "missing field `version`");
    assert_refused(br#"{"version": "1"}"#, "not valid device state");
    assert_refused(br#"{"version": 2}"#, "missing field");
}

#[tokio::test]
async fn future_versions_and_unknown_fields_are_refused() {
    let (_, v) = good_state().await;
    assert_refused(
        &edited(&v, |v| v["version"] = json!(3)),
        "unsupported device state version 3 (this build reads version 2)",
    );
    assert_refused(
        &edited(&v, |v| v["version"] = json!(1)),
        "unsupported device state version 1 (this build reads version 2)",
    );
    assert_refused(
        &edited(&v, |v| v["version"] = json!(0)),
        "unsupported device state version 0",
    );
    assert_refused(
        &edited(&v, |v| v["extra"] = json!(true)),
        "unknown field `extra`",
    );
    assert_refused(
        &edited(&v, |v| v["devices"][0]["colour"] = json!("red")),
        "unknown field `colour`",
    );
}

#[tokio::test]
async fn missing_fields_are_refused() {
    let (_, v) = good_state().await;
    for (field, edit) in [
        (
            "next_id",
            Box::new(|v: &mut Value| drop(v.as_object_mut().unwrap().remove("next_id")))
                as Box<dyn Fn(&mut Value)>,
        ),
        (
            "allocators",
            Box::new(|v: &mut Value| drop(v.as_object_mut().unwrap().remove("allocators"))),
        ),
        (
            "status",
            Box::new(|v: &mut Value| {
                drop(v["devices"][0].as_object_mut().unwrap().remove("status"))
            }),
        ),
        (
            "host_path",
            Box::new(|v: &mut Value| {
                drop(v["devices"][1].as_object_mut().unwrap().remove("host_path"))
            }),
        ),
        (
            "pci",
            Box::new(|v: &mut Value| drop(v["allocators"].as_object_mut().unwrap().remove("pci"))),
        ),
    ] {
        assert_refused(&edited(&v, edit), &format!("missing field `{field}`"));
    }
}

#[tokio::test]
async fn inconsistent_files_are_refused() {
    let (_, v) = good_state().await;
    let cases: Vec<(&str, Edit)> = vec![
        ("block index 9 is allocated but no device holds it", Box::new(|v| v["allocators"]["block"]["held"] = json!([0, 1, 2, 9]))),
        ("held by dev1 is not allocated", Box::new(|v| v["allocators"]["block"]["held"] = json!([0, 2]))),
        ("held by both", Box::new(|v| v["devices"][1]["resources"]["block_index"] = json!(0))),
        ("attach count 3 exceeds reference count 2", Box::new(|v| v["devices"][0]["attach_count"] = json!(3))),
        ("reference count is 0", Box::new(|v| v["devices"][5]["uses"] = json!([]))),
        ("not below next_id", Box::new(|v| v["next_id"] = json!(3))),
        ("appears twice", Box::new(|v| v["devices"][1]["id"] = json!("dev0"))),
        ("duplicates another device", Box::new(|v| {
            let mut copy = v["devices"][0].clone();
            copy["id"] = json!("dev9");
            copy["status"] = json!("detached");
            copy["attach_count"] = json!(0);
            copy.as_object_mut().unwrap().remove("resources");
            copy.as_object_mut().unwrap().remove("guest_address");
            v["devices"].as_array_mut().unwrap().push(copy);
            v["next_id"] = json!(10);
        })),
        ("guest address does not match", Box::new(|v| drop(v["devices"][0].as_object_mut().unwrap().remove("guest_address")))),
        ("impossible while detached", Box::new(|v| v["devices"][0]["status"] = json!("detached"))),
        ("a vfio device that is attached holds PCI slots [1, 2] but needs block index: none, pmem index: none, PCI slots: 3", Box::new(|v| v["devices"][2]["resources"]["pci_slots"] = json!([1, 2]))),
        ("users disagree on read-only", Box::new(|v| {
            let mut u = v["devices"][0]["uses"][0].clone();
            u["request"]["read_only"] = json!(true);
            v["devices"][0]["uses"].as_array_mut().unwrap().push(u);
        })),
        ("PCI slot range", Box::new(|v| v["allocators"]["pci"]["end"] = json!(64))),
        ("labelled", Box::new(|v| v["allocators"]["pmem"]["space"] = json!("block"))),
        ("not strictly ascending", Box::new(|v| v["allocators"]["block"]["held"] = json!([1, 0, 2]))),
        ("expected dev<N>", Box::new(|v| v["devices"][0]["id"] = json!("dev00"))),
        ("PCI path", Box::new(|v| v["devices"][2]["guest_address"]["address"][0] = json!("zz"))),
        ("host path dev/sda is not an absolute normalised path", Box::new(|v| v["devices"][0]["host_path"] = json!("dev/sda"))),
        ("host path /dev/../etc/x is not an absolute normalised path", Box::new(|v| v["devices"][0]["host_path"] = json!("/dev/../etc/x"))),
        ("container path xvd0 is not an absolute", Box::new(|v| v["devices"][0]["uses"][0]["request"]["container_path"] = json!("xvd0"))),
        ("socket sock is not an absolute", Box::new(|v| v["devices"][3]["kind"]["socket"] = json!("sock"))),
        ("cgroup access \"rxw\" of /dev/xvd0 is not a canonical subset", Box::new(|v| v["devices"][0]["uses"][0]["request"]["cgroup_access"] = json!("rxw"))),
        ("cgroup access \"wr\"", Box::new(|v| v["devices"][0]["uses"][0]["request"]["cgroup_access"] = json!("wr"))),
        ("the use of the runtime (test) carries an OCI request", Box::new(|v| v["devices"][0]["uses"][0]["owner"] = json!({"owner": "runtime", "name": "test"}))),
        ("the use of container c lacks an OCI request", Box::new(|v| drop(v["devices"][0]["uses"][0].as_object_mut().unwrap().remove("request")))),
        ("unknown variant `pod`", Box::new(|v| v["devices"][0]["uses"][0]["owner"]["owner"] = json!("pod"))),
        ("VFIO group name \"../7\" is not valid", Box::new(|v| v["devices"][2]["kind"]["group"] = json!("../7"))),
    ];
    for (want, edit) in cases {
        assert_refused(&edited(&v, edit), want);
    }
}

#[test]
fn a_second_store_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = FileStore::open(dir.path()).unwrap();
    let e = FileStore::open(dir.path()).unwrap_err();
    assert!(matches!(e, StateError::Locked { .. }));
    assert!(e.to_string().contains("locked by another process"), "{e}");
    assert!(
        e.to_string().contains(&dir.path().display().to_string()),
        "{e}"
    );
    drop(first);
    FileStore::open(dir.path()).unwrap();
}

#[tokio::test]
async fn a_stale_temp_file_is_ignored_and_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let live = populate(dir.path()).await;
    let temp = dir.path().join(TEMP_FILE);
    std::fs::write(&temp, b"{\"version\": 1, \"devi").unwrap();
    let loaded = load(dir.path()).unwrap();
    assert_eq!(loaded.snapshot(), live);
    assert!(!temp.exists());
}

#[tokio::test]
async fn new_refuses_existing_state_and_load_refuses_none() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path()).await;
    let bytes = std::fs::read(dir.path().join(STATE_FILE)).unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let e = DeviceManager::new(config(), Arc::new(RecordingBackend::new()), store).unwrap_err();
    assert!(matches!(e, ManagerError::StateExists { .. }), "{e}");
    assert_eq!(std::fs::read(dir.path().join(STATE_FILE)).unwrap(), bytes);

    let empty = tempfile::tempdir().unwrap();
    let e = load(empty.path()).unwrap_err();
    assert!(matches!(e, ManagerError::StateMissing { .. }), "{e}");
    assert!(!empty.path().join(STATE_FILE).exists());
    // A new manager writes its empty state at once, so it always reloads.
    let mgr = DeviceManager::new(
        config(),
        Arc::new(RecordingBackend::new()),
        FileStore::open(empty.path()).unwrap(),
    )
    .unwrap();
    drop(mgr);
    assert!(load(empty.path()).unwrap().is_empty());
    // Nothing is ever read from a null store.
    assert!(DeviceManager::load(config(), Arc::new(RecordingBackend::new()), NullStore).is_err());
}

#[tokio::test]
async fn a_failed_write_keeps_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let live = populate(dir.path()).await;
    let path = dir.path().join(STATE_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let (io, faults) = FaultyIo::new();
    let mut store = FileStore::open_with_io(dir.path(), Box::new(io)).unwrap();
    let mut changed = live.clone();
    changed.next_id += 1;
    for step in [FaultStep::Write, FaultStep::Rename] {
        faults.fail_save(1, step);
        let e = store.save(&changed).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        let errno = if step == FaultStep::Write {
            "No space left on device"
        } else {
            "Input/output error"
        };
        assert!(msg.contains(errno), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{step:?}");
        assert!(!dir.path().join(TEMP_FILE).exists(), "{step:?}");
        assert_eq!(
            decode(&store.load().unwrap().unwrap(), &config()).unwrap(),
            live
        );
    }
    // A failed directory fsync is reported; the renamed file is complete.
    faults.fail_save(1, FaultStep::SyncDir);
    assert!(store
        .save(&changed)
        .unwrap_err()
        .to_string()
        .contains("fsync directory"));
    assert_eq!(
        decode(&std::fs::read(&path).unwrap(), &config()).unwrap(),
        changed
    );
    store.save(&live).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[tokio::test]
async fn a_full_disk_fails_operations_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (io, faults) = FaultyIo::new();
    let backend = Arc::new(RecordingBackend::new());
    let mgr = DeviceManager::new(
        config(),
        backend.clone(),
        FileStore::open_with_io(dir.path(), Box::new(io)).unwrap(),
    )
    .unwrap();
    let id = mgr.add(devices::block(0)).unwrap();
    let path = dir.path().join(STATE_FILE);
    let bytes = std::fs::read(&path).unwrap();
    faults.set_broken(true);
    let before = mgr.snapshot();
    let e = mgr.attach(&id).await.unwrap_err();
    assert!(e.to_string().contains("No space left on device"), "{e}");
    assert!(mgr.add(devices::block(1)).is_err());
    assert!(mgr.remove(&id).await.is_err());
    assert_eq!(mgr.snapshot(), before);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(backend.call_count(), 0);
    faults.set_broken(false);
    mgr.attach(&id).await.unwrap();
}

/// A file written just before a crash in the middle of a hotplug: the device
/// is `attaching` with its addresses reserved.
#[tokio::test]
async fn an_interrupted_attach_is_loaded_and_resolved() {
    let (_, v) = good_state().await;
    let interrupted = edited(&v, |v| {
        let d = &mut v["devices"][0];
        d["status"] = json!("attaching");
        d["attach_count"] = json!(0);
        d.as_object_mut().unwrap().remove("guest_address");
    });
    for resolve_by_unplug in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), &interrupted).unwrap();
        let backend = Arc::new(RecordingBackend::new());
        let mgr = DeviceManager::load(
            config(),
            backend.clone(),
            FileStore::open(dir.path()).unwrap(),
        )
        .unwrap();
        let id = DeviceId(0);
        assert_eq!(mgr.get(&id).unwrap().status, DeviceStatus::Attaching);
        let e = mgr.attach(&id).await.unwrap_err();
        assert!(e.to_string().contains("it is attaching"), "{e}");
        // One of its two references may go, not the last one.
        assert_eq!(mgr.remove(&id).await.unwrap(), 1);
        let e = mgr.remove(&id).await.unwrap_err();
        assert!(e.to_string().contains("it is attaching"), "{e}");
        if resolve_by_unplug {
            // The hotplug may have happened: unplug to be sure.
            mgr.detach(&id).await.unwrap();
            assert_eq!(
                backend.ops(),
                [(capsule_devmgr::testing::BackendOp::Unplug, "dev0".into())]
            );
        } else {
            // The caller knows it never reached the VM.
            mgr.complete_pending(&id).await.unwrap();
            assert_eq!(backend.call_count(), 0);
        }
        let rec = mgr.get(&id).unwrap();
        assert_eq!(
            (rec.status, rec.resources.is_empty()),
            (DeviceStatus::Detached, true)
        );
        assert!(!mgr.snapshot().allocators.block.contains(0));
        mgr.attach(&id).await.unwrap();
        assert_eq!(mgr.get(&id).unwrap().block_index(), Some(0));
    }
}
