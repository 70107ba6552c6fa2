//! State-file faults through the `StateIo` seam, and torn or corrupted files.
//!
//! * Every manager operation (new device, new reference, attach, attach of a
//!   VFIO group, counted attach, generic attach, detach, counted detach,
//!   pending detach, complete-pending, remove) with its state write failing
//!   at every save it makes and at every step of that save: ENOSPC or EIO on
//!   the write, a short write, a failed fsync of the file, a failed rename, a
//!   failed fsync of the directory. Once (a transient fault) and for good (a
//!   disk that stays broken).
//! * Temp files left behind by a crash (garbage, partial, a complete newer
//!   state, empty, a directory, a symlink).
//! * Torn writes: the state file truncated at every offset, and single bytes
//!   replaced, each loaded by a fresh `FileStore`.
//!
//! What a failed write must leave (asserted after every case): the operation
//! fails with an error naming the state file and the errno; memory is what
//! it was before the operation, unless the hypervisor was already changed
//! (then memory records the truth and the error says the file lags); the
//! file loads, with a fresh `FileStore` after dropping the manager, to
//! exactly what memory holds (or, in the documented lagging case, to the
//! device shown in flight); allocators, records and backend agree
//! (`check_consistency`); no temp file is left.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use capsule_devmgr::device::{BlockDriver, VhostUserKind};
use capsule_devmgr::manager::{DeviceId, DeviceManager, DeviceStatus, ManagerConfig, ManagerError};
use capsule_devmgr::state::{
    decode, encode, validate, FileStore, SandboxState, StateError, STATE_FILE, TEMP_FILE,
};
use capsule_devmgr::testing::ManagerTestExt;
use capsule_devmgr::testing::{
    check_consistency, devices, FaultStep, FaultSwitch, FaultyIo, RecordingBackend,
};
use serde_json::Value;

fn config() -> ManagerConfig {
    ManagerConfig::new(BlockDriver::VirtioScsi, 1..32)
}

/// A temp dir on tmpfs when there is one: thousands of state files are
/// written and fsynced here, and the faults are injected, not real, so a
/// disk only makes the tests slow.
fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// The faults every save is tried with: (step, errno).
const FAULTS: [(FaultStep, i32); 6] = [
    (FaultStep::Write, libc::ENOSPC),
    (FaultStep::Write, libc::EIO),
    (FaultStep::ShortWrite, libc::ENOSPC),
    (FaultStep::SyncFile, libc::EIO),
    (FaultStep::Rename, libc::EIO),
    (FaultStep::SyncDir, libc::EIO),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    NewDevice,
    AddReference,
    AttachFirst,
    AttachVfio,
    AttachAgain,
    AttachGeneric,
    DetachLast,
    DetachCounted,
    DetachPending,
    CompletePending,
    RemoveReference,
    RemoveLast,
}

const OPS: [Op; 12] = [
    Op::NewDevice,
    Op::AddReference,
    Op::AttachFirst,
    Op::AttachVfio,
    Op::AttachAgain,
    Op::AttachGeneric,
    Op::DetachLast,
    Op::DetachCounted,
    Op::DetachPending,
    Op::CompletePending,
    Op::RemoveReference,
    Op::RemoveLast,
];

impl Op {
    /// Whether the operation changes the hypervisor at its save number
    /// `save` (1-based), so that a failure of this and later saves cannot
    /// be undone in memory: the unplug of a detach has happened.
    fn irrevocable_from(self, save: u64) -> bool {
        matches!(self, Op::DetachLast | Op::DetachPending) && save >= 2
    }
}

/// One sandbox whose state writes go through a [`FaultyIo`].
struct Env {
    dir: tempfile::TempDir,
    backend: Arc<RecordingBackend>,
    mgr: Option<DeviceManager>,
    faults: FaultSwitch,
    target: DeviceId,
}

impl Env {
    async fn new(op: Op) -> Self {
        let dir = tempdir();
        let (io, faults) = FaultyIo::new();
        let backend = Arc::new(RecordingBackend::new());
        let store = FileStore::open_with_io(dir.path(), Box::new(io)).unwrap();
        let mgr = DeviceManager::new(config(), backend.clone(), store).unwrap();
        // A bystander, attached, so no file is trivially small.
        let other = mgr.add(devices::pmem(0)).unwrap();
        mgr.attach(&other).await.unwrap();
        let target = match op {
            Op::NewDevice => DeviceId(u64::MAX),
            Op::AddReference
            | Op::AttachFirst
            | Op::RemoveLast
            | Op::DetachLast
            | Op::DetachPending
            | Op::CompletePending => mgr.add(devices::block(0)).unwrap(),
            Op::AttachVfio => mgr.add(devices::vfio(4, 2, 1)).unwrap(),
            Op::AttachGeneric => mgr.add(devices::char_dev(4, 1)).unwrap(),
            Op::AttachAgain | Op::DetachCounted | Op::RemoveReference => {
                mgr.add(devices::block(0)).unwrap();
                mgr.add(devices::block(0)).unwrap()
            }
        };
        match op {
            Op::AttachAgain | Op::DetachLast | Op::DetachPending => {
                mgr.attach(&target).await.unwrap();
            }
            Op::DetachCounted => {
                mgr.attach(&target).await.unwrap();
                mgr.attach(&target).await.unwrap();
            }
            Op::CompletePending => {
                mgr.attach(&target).await.unwrap();
                backend.pend_next_unplug();
                mgr.detach(&target).await.unwrap();
                assert_eq!(
                    mgr.get(&target).unwrap().status,
                    DeviceStatus::UnplugPending
                );
            }
            _ => {}
        }
        if op == Op::DetachPending {
            backend.pend_unplugs_of(&target.to_string());
        }
        Self {
            dir,
            backend,
            mgr: Some(mgr),
            faults,
            target,
        }
    }

    fn mgr(&self) -> &DeviceManager {
        self.mgr.as_ref().unwrap()
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join(STATE_FILE)
    }

    fn file_bytes(&self) -> Vec<u8> {
        std::fs::read(self.path()).unwrap()
    }

    fn file_state(&self) -> SandboxState {
        decode(&self.file_bytes(), &config()).unwrap()
    }

    async fn run(&self, op: Op) -> Result<(), ManagerError> {
        let mgr = self.mgr();
        let id = &self.target;
        match op {
            Op::NewDevice => mgr.add(devices::block(1)).map(drop),
            Op::AddReference => mgr.add(devices::block(0)).map(drop),
            Op::AttachFirst | Op::AttachVfio | Op::AttachAgain | Op::AttachGeneric => {
                mgr.attach(id).await.map(drop)
            }
            Op::DetachLast | Op::DetachCounted | Op::DetachPending => {
                mgr.detach(id).await.map(drop)
            }
            Op::CompletePending => {
                // The guest released it (a late DEVICE_DELETED).
                self.backend.complete_unplug(&id.to_string());
                mgr.complete_pending(id).await
            }
            Op::RemoveReference | Op::RemoveLast => mgr.remove(id).await.map(drop),
        }
    }

    /// Invariants and the backend; for `CompletePending` the backend has
    /// already dropped the device while a failed operation leaves it
    /// pending in the manager, which is the point of that status.
    fn check(&self, op: Op, what: &str) {
        let snap = self.mgr().snapshot();
        validate(&snap, &config()).unwrap_or_else(|e| panic!("{what}: {e}"));
        if op != Op::CompletePending
            || snap.devices.get(&self.target).map(|r| r.status) != Some(DeviceStatus::UnplugPending)
        {
            check_consistency(self.mgr(), &self.backend).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        assert!(
            !self.dir.path().join(TEMP_FILE).exists(),
            "{what}: temp file left behind"
        );
    }

    /// Drops the manager (a shim restart) and loads the directory with a
    /// fresh `FileStore` on the real file system; returns what it loaded.
    fn reload(&mut self) -> SandboxState {
        drop(self.mgr.take());
        let store = FileStore::open(self.dir.path()).unwrap();
        let mgr = DeviceManager::load(config(), self.backend.clone(), store).unwrap();
        let snap = mgr.snapshot();
        self.mgr = Some(mgr);
        snap
    }
}

/// The error must be a state write failure naming the state file and the
/// errno.
fn assert_names_file_and_errno(e: &ManagerError, dir: &Path, errno: i32, what: &str) {
    let msg = e.to_string();
    assert!(
        matches!(e, ManagerError::StateWrite { .. }),
        "{what}: not a state write error: {msg}"
    );
    let file = dir.join(STATE_FILE).display().to_string();
    assert!(msg.contains(&file), "{what}: does not name {file}: {msg}");
    let errno_text = std::io::Error::from_raw_os_error(errno).to_string();
    assert!(
        msg.contains(&errno_text),
        "{what}: does not name the errno ({errno_text}): {msg}"
    );
    assert!(msg.contains("could not be saved"), "{what}: {msg}");
}

/// The clean run of `op`: its number of saves and the state after it.
async fn clean_run(op: Op) -> (u64, SandboxState, SandboxState) {
    let env = Env::new(op).await;
    let before = env.mgr().snapshot();
    let s0 = env.faults.saves();
    env.run(op).await.unwrap();
    env.check(op, &format!("{op:?} clean"));
    let saves = env.faults.saves() - s0;
    assert!(saves >= 1, "{op:?} saved nothing");
    (saves, before, env.mgr().snapshot())
}

#[tokio::test]
async fn a_transient_fault_at_any_save_and_step_loses_nothing() {
    let mut cases = 0;
    for op in OPS {
        let (saves, before, after) = clean_run(op).await;
        for k in 1..=saves {
            for (step, errno) in FAULTS {
                let what = format!("{op:?}, save {k} of {saves}, {step:?} errno {errno}");
                let mut env = Env::new(op).await;
                assert_eq!(env.mgr().snapshot(), before, "{what}: setup");
                let bytes_before = env.file_bytes();
                env.faults.fail_save_with(k, step, errno);
                let result = env.run(op).await;
                let mem = env.mgr().snapshot();
                match &result {
                    // The unplug happened; the write is retried once, which
                    // succeeds after a transient fault.
                    Ok(()) => {
                        assert!(op.irrevocable_from(k), "{what}: succeeded");
                        assert_eq!(mem, after, "{what}");
                    }
                    Err(e) => {
                        assert!(!op.irrevocable_from(k), "{what}: {e}");
                        assert_names_file_and_errno(e, env.dir.path(), errno, &what);
                        assert_eq!(mem, before, "{what}: memory changed");
                        // The undone state was written again (after a
                        // failed directory fsync the new file was in place).
                        assert_eq!(env.file_bytes(), bytes_before, "{what}: file changed");
                    }
                }
                assert_eq!(env.file_state(), mem, "{what}: file differs from memory");
                env.check(op, &what);
                assert_eq!(env.reload(), mem, "{what}: reload differs");
                env.check(op, &format!("{what}, reloaded"));
                // Nothing is stuck: the operation works once the disk does.
                if result.is_err() {
                    env.run(op)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: retry: {e}"));
                    assert_eq!(env.mgr().snapshot(), after, "{what}: retry");
                    assert_eq!(env.file_state(), after, "{what}: retry file");
                    env.check(op, &format!("{what}, retried"));
                }
                cases += 1;
            }
        }
    }
    eprintln!("state faults, transient: {cases} cases");
    assert!(cases >= 90, "{cases}");
}

#[tokio::test]
async fn a_disk_that_stays_broken_fails_every_operation_and_loses_nothing() {
    let mut cases = 0;
    let mut lagging = 0;
    for op in OPS {
        let (saves, before, after) = clean_run(op).await;
        for k in 1..=saves {
            for (step, errno) in FAULTS {
                let what = format!("{op:?}, saves {k}.. broken, {step:?} errno {errno}");
                let mut env = Env::new(op).await;
                // Every save from the k-th on fails (undo writes included).
                for n in k..k + 16 {
                    env.faults.fail_save_with(n, step, errno);
                }
                let e = env.run(op).await.unwrap_err();
                assert_names_file_and_errno(&e, env.dir.path(), errno, &what);
                let msg = e.to_string();
                let mem = env.mgr().snapshot();
                if op.irrevocable_from(k) {
                    // The VM changed; memory records the truth.
                    assert_eq!(mem, after, "{what}");
                } else {
                    assert_eq!(mem, before, "{what}: memory changed");
                }
                env.check(op, &what);
                // The file is always loadable and consistent.
                let file = env.file_state();
                if file != mem {
                    // Allowed only when the hypervisor was touched (a
                    // hotplug undone by an unplug, or an unplug) and the
                    // error says the file lags: the file then shows the
                    // device in flight, never less than the VM may have.
                    lagging += 1;
                    let t = env.target;
                    let rec = file.devices.get(&t).unwrap();
                    // A pending unplug saved as `detaching` is the same
                    // thing to recovery (both are unplugged again), so that
                    // error need not mention it.
                    let equivalent = rec.status == DeviceStatus::Detaching
                        && mem.devices.get(&t).map(|r| r.status)
                            == Some(DeviceStatus::UnplugPending);
                    assert!(
                        equivalent || msg.contains("failed too") || msg.contains("still shows"),
                        "{what}: file lags without saying so: {msg}"
                    );
                    assert!(
                        matches!(
                            rec.status,
                            DeviceStatus::Attaching | DeviceStatus::Detaching
                        ),
                        "{what}: file shows {} as {}",
                        t,
                        rec.status
                    );
                    let mut others = file.clone();
                    others.devices.remove(&t);
                    let mut mem_others = mem.clone();
                    mem_others.devices.remove(&t);
                    assert_eq!(
                        others.devices, mem_others.devices,
                        "{what}: other devices differ"
                    );
                }
                // The disk recovers: persist catches the file up, a reload
                // sees memory, and the operation (if undone) works.
                env.faults.clear();
                env.mgr().persist().unwrap();
                assert_eq!(env.file_state(), mem, "{what}: persist");
                assert_eq!(env.reload(), mem, "{what}: reload");
                env.check(op, &format!("{what}, reloaded"));
                if mem == before {
                    env.run(op)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: retry: {e}"));
                    assert_eq!(env.mgr().snapshot(), after, "{what}: retry");
                    env.check(op, &format!("{what}, retried"));
                }
                cases += 1;
            }
        }
    }
    eprintln!(
        "state faults, persistent: {cases} cases ({lagging} with the file lagging as reported)"
    );
    assert!(cases >= 90, "{cases}");
}

/// The first save of a new manager failing: the manager is not created and
/// the error names the file and the errno. Only after a failed directory
/// fsync is the (empty) state file in place; it loads, and a retried
/// `DeviceManager::new` takes it over (it records nothing), while a state
/// with a device in it is refused with `StateExists`.
#[test]
fn a_new_sandbox_whose_first_write_fails_is_not_created() {
    for (step, errno) in FAULTS {
        let dir = tempdir();
        let (io, faults) = FaultyIo::new();
        faults.fail_save_with(1, step, errno);
        let store = FileStore::open_with_io(dir.path(), Box::new(io)).unwrap();
        let e = DeviceManager::new(config(), Arc::new(RecordingBackend::new()), store).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ManagerError::Persist { .. }), "{msg}");
        let errno_text = std::io::Error::from_raw_os_error(errno).to_string();
        assert!(msg.contains(&errno_text), "{step:?}: {msg}");
        assert!(
            msg.contains(&dir.path().join(STATE_FILE).display().to_string()),
            "{step:?}: {msg}"
        );
        assert!(!dir.path().join(TEMP_FILE).exists(), "{step:?}");
        // Before the rename nothing is there; after it (a failed directory
        // fsync) the empty state is, and loads.
        let store = FileStore::open(dir.path()).unwrap();
        match DeviceManager::load(config(), Arc::new(RecordingBackend::new()), store) {
            Err(ManagerError::StateMissing { .. }) => assert_ne!(step, FaultStep::SyncDir),
            Ok(m) => {
                assert_eq!(step, FaultStep::SyncDir);
                assert!(m.is_empty());
                drop(m);
                let store = FileStore::open(dir.path()).unwrap();
                let again =
                    DeviceManager::new(config(), Arc::new(RecordingBackend::new()), store).unwrap();
                again.add(devices::block(0)).unwrap();
                drop(again);
                let store = FileStore::open(dir.path()).unwrap();
                let third = DeviceManager::new(config(), Arc::new(RecordingBackend::new()), store);
                assert!(matches!(third, Err(ManagerError::StateExists { .. })));
            }
            Err(e) => panic!("{step:?}: {e}"),
        }
    }
}

/// A sandbox with one of everything, in `dir`; returns its snapshot.
async fn populate(dir: &Path) -> SandboxState {
    let backend = Arc::new(RecordingBackend::new());
    let mgr = DeviceManager::new(config(), backend.clone(), FileStore::open(dir).unwrap()).unwrap();
    let scsi = mgr.add(devices::block(0)).unwrap();
    mgr.add(devices::block(0)).unwrap();
    let mut ro = devices::block(1);
    ro.info.as_mut().unwrap().read_only = true;
    let ro = mgr.add(ro).unwrap();
    let gpu = mgr.add(devices::vfio(4, 2, 1)).unwrap();
    let blk = mgr.add(devices::vhost_user(VhostUserKind::Blk, 1)).unwrap();
    let fs = mgr.add(devices::vhost_user(VhostUserKind::Fs, 2)).unwrap();
    let pmem = mgr.add(devices::pmem(0)).unwrap();
    let tty = mgr.add(devices::char_dev(4, 1)).unwrap();
    let pending = mgr
        .add(devices::vhost_user(VhostUserKind::Scsi, 3))
        .unwrap();
    mgr.add(devices::runtime_block("/img/idle")).unwrap();
    for id in [scsi, scsi, ro, gpu, blk, fs, pmem, tty, pending] {
        mgr.attach(&id).await.unwrap();
    }
    backend.pend_next_unplug();
    mgr.detach(&pending).await.unwrap();
    check_consistency(&mgr, &backend).unwrap();
    mgr.snapshot()
}

/// A crash between writing the temp file and renaming it leaves the temp
/// file; whatever it holds, the last complete state loads and the temp file
/// is removed.
#[tokio::test]
async fn a_temp_file_left_by_a_crash_never_replaces_the_last_good_state() {
    let src = tempdir();
    let good = populate(src.path()).await;
    let good_bytes = std::fs::read(src.path().join(STATE_FILE)).unwrap();
    let mut newer = good.clone();
    newer.next_id += 5;
    let newer_bytes = encode(&newer).unwrap();
    let leftovers: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\xff\xfe\x7fnot json at all".to_vec()),
        ("partial", newer_bytes[..newer_bytes.len() / 3].to_vec()),
        (
            "all but the last byte",
            newer_bytes[..newer_bytes.len() - 2].to_vec(),
        ),
        ("a complete newer state", newer_bytes.clone()),
        ("empty", Vec::new()),
        ("1 MiB of zeros", vec![0; 1 << 20]),
    ];
    let mut cases = 0;
    for (what, content) in leftovers {
        let dir = tempdir();
        std::fs::write(dir.path().join(STATE_FILE), &good_bytes).unwrap();
        let temp = dir.path().join(TEMP_FILE);
        std::fs::write(&temp, &content).unwrap();
        let backend = Arc::new(RecordingBackend::new());
        let mgr = DeviceManager::load(
            config(),
            backend.clone(),
            FileStore::open(dir.path()).unwrap(),
        )
        .unwrap();
        assert_eq!(mgr.snapshot(), good, "{what}");
        assert!(!temp.exists(), "{what}: temp file kept");
        assert_eq!(
            std::fs::read(dir.path().join(STATE_FILE)).unwrap(),
            good_bytes,
            "{what}"
        );
        // The next write is a normal one.
        let id = mgr.add(devices::block(9)).unwrap();
        assert_eq!(id.0, good.next_id, "{what}");
        let on_disk = decode(
            &std::fs::read(dir.path().join(STATE_FILE)).unwrap(),
            &config(),
        )
        .unwrap();
        assert_eq!(on_disk, mgr.snapshot(), "{what}");
        assert!(!temp.exists(), "{what}");
        cases += 1;
    }

    // A directory in the temp file's place cannot be removed: the store
    // refuses to open, naming it, and changes nothing.
    let dir = tempdir();
    std::fs::write(dir.path().join(STATE_FILE), &good_bytes).unwrap();
    let temp = dir.path().join(TEMP_FILE);
    std::fs::create_dir(&temp).unwrap();
    std::fs::write(temp.join("x"), b"x").unwrap();
    let e = FileStore::open(dir.path()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StateError::Io { .. }), "{msg}");
    assert!(msg.contains(&temp.display().to_string()), "{msg}");
    assert!(msg.contains("Is a directory"), "{msg}");
    assert_eq!(
        std::fs::read(dir.path().join(STATE_FILE)).unwrap(),
        good_bytes
    );
    cases += 1;

    // A symlink in its place is removed, never followed.
    let dir = tempdir();
    std::fs::write(dir.path().join(STATE_FILE), &good_bytes).unwrap();
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(outside.path(), b"precious").unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join(TEMP_FILE)).unwrap();
    let mgr = DeviceManager::load(
        config(),
        Arc::new(RecordingBackend::new()),
        FileStore::open(dir.path()).unwrap(),
    )
    .unwrap();
    assert_eq!(mgr.snapshot(), good);
    mgr.add(devices::block(9)).unwrap();
    assert_eq!(std::fs::read(outside.path()).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(dir.path().join(TEMP_FILE)).is_err());
    cases += 1;
    eprintln!("state faults, temp files: {cases} cases");
}

#[derive(Debug, Default)]
struct Tally {
    refused: usize,
    same_state: usize,
    other_valid_state: usize,
}

/// Loads `bytes` as the state file of `dir` with a fresh `FileStore`. The
/// rule: the load is refused (an error naming the file), or the file
/// decodes to a state that passes `validate` and re-encodes to the same
/// JSON value the file holds (nothing ignored, nothing half-applied) -- and
/// if that value is the original's, the state is exactly the original.
/// Either way the file is not touched and no temp file appears.
fn load_case(
    dir: &Path,
    bytes: &[u8],
    original: &SandboxState,
    original_value: &Value,
    tally: &mut Tally,
    what: &str,
) {
    let path = dir.join(STATE_FILE);
    std::fs::write(&path, bytes).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        DeviceManager::load(
            config(),
            Arc::new(RecordingBackend::quiet()),
            FileStore::open(dir).unwrap(),
        )
    }))
    .unwrap_or_else(|_| panic!("{what}: load panicked"));
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "{what}: file changed");
    assert!(!dir.join(TEMP_FILE).exists(), "{what}: temp file");
    match result {
        Err(e) => {
            let msg = e.to_string();
            assert!(matches!(e, ManagerError::Load { .. }), "{what}: {msg}");
            assert!(
                msg.contains(&path.display().to_string()),
                "{what}: does not name the file: {msg}"
            );
            tally.refused += 1;
        }
        Ok(mgr) => {
            let state = mgr.snapshot();
            validate(&state, &config()).unwrap_or_else(|e| panic!("{what}: {e}"));
            let file_value: Value = serde_json::from_slice(bytes).unwrap();
            let loaded_value: Value = serde_json::from_slice(&encode(&state).unwrap()).unwrap();
            assert_eq!(
                loaded_value, file_value,
                "{what}: the loaded state does not hold what the file says"
            );
            if file_value == *original_value {
                assert_eq!(state, *original, "{what}");
                tally.same_state += 1;
            } else {
                tally.other_valid_state += 1;
            }
        }
    }
}

#[tokio::test]
async fn a_state_file_truncated_at_any_offset_is_refused_untouched() {
    let src = tempdir();
    let original = populate(src.path()).await;
    let bytes = std::fs::read(src.path().join(STATE_FILE)).unwrap();
    let value: Value = serde_json::from_slice(&bytes).unwrap();
    let dir = tempdir();
    let mut tally = Tally::default();
    for cut in 0..bytes.len() {
        load_case(
            dir.path(),
            &bytes[..cut],
            &original,
            &value,
            &mut tally,
            &format!("truncated to {cut} of {} bytes", bytes.len()),
        );
    }
    eprintln!(
        "torn writes, truncations: {} cases ({} bytes): {tally:?}",
        bytes.len(),
        bytes.len()
    );
    // Only the trailing newline may go: the JSON is complete without it.
    assert_eq!(tally.same_state, 1, "{tally:?}");
    assert_eq!(tally.other_valid_state, 0, "{tally:?}");
}

#[tokio::test]
async fn a_state_file_with_a_damaged_byte_is_refused_or_fully_consistent() {
    let src = tempdir();
    let original = populate(src.path()).await;
    let bytes = std::fs::read(src.path().join(STATE_FILE)).unwrap();
    let value: Value = serde_json::from_slice(&bytes).unwrap();
    let dir = tempdir();
    let mut tally = Tally::default();
    let mut skipped = 0;
    // Every byte of the first 2 KiB, then every 5th.
    let positions = (0..bytes.len().min(2048)).chain((2048..bytes.len()).step_by(5));
    let mut cases = 0;
    for pos in positions {
        let old = bytes[pos];
        for new in [0x00, 0xff, old ^ 1, b'}'] {
            if new == old {
                skipped += 1;
                continue;
            }
            let mut damaged = bytes.clone();
            damaged[pos] = new;
            load_case(
                dir.path(),
                &damaged,
                &original,
                &value,
                &mut tally,
                &format!(
                    "byte {pos} {:?} -> {:?} (near {:?})",
                    old as char,
                    new as char,
                    String::from_utf8_lossy(
                        &bytes[pos.saturating_sub(20)..(pos + 20).min(bytes.len())]
                    )
                ),
            );
            cases += 1;
        }
    }
    eprintln!(
        "torn writes, damaged bytes: {cases} cases ({} bytes, {skipped} no-op replacements skipped): {tally:?}",
        bytes.len()
    );
    assert!(cases >= 4000, "{cases}");
}

/// A damaged key inside a nested object (a request, a device kind, a VFIO
/// function or group, a guest address) is refused, never read as a missing
/// optional field: found by the damaged-byte test above (`file_mode` ->
/// `gile_mode` loaded as "no mode").
#[tokio::test]
async fn a_damaged_key_in_a_nested_object_is_refused() {
    let src = tempdir();
    populate(src.path()).await;
    let text = std::fs::read_to_string(src.path().join(STATE_FILE)).unwrap();
    let dir = tempdir();
    for (key, damaged) in [
        ("\"file_mode\"", "\"gile_mode\""),
        ("\"uid\"", "\"tid\""),
        ("\"cgroup_access\"", "\"cgroup_accest\""),
        ("\"tag\"", "\"tah\""),
        ("\"large_bar\"", "\"large_bas\""),
        ("\"sysfsdev\"", "\"sysfsdew\""),
        ("\"mode\": \"legacy\"", "\"mode\": \"legacy\", \"extra\": 1"),
        ("\"type\": \"scsi\"", "\"type\": \"scsi\", \"lun\": 3"),
    ] {
        assert!(text.contains(key), "{key}");
        let bytes = text.replacen(key, damaged, 1);
        let path = dir.path().join(STATE_FILE);
        std::fs::write(&path, &bytes).unwrap();
        let e = DeviceManager::load(
            config(),
            Arc::new(RecordingBackend::quiet()),
            FileStore::open(dir.path()).unwrap(),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("not valid device state")
                && (msg.contains("unknown field")
                    || msg.contains("expected \"type\" or \"address\"")),
            "{key}: {msg}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes.as_bytes());
    }
}
