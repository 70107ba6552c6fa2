//! Test doubles (feature `test-utils`): a [`RecordingBackend`] that records
//! every call and fails, stalls or leaves unplugs pending on request, a
//! [`FaultyIo`] that makes state writes fail at a chosen step, and
//! [`loop_host`], a fixture host with loop devices. Public so later crates'
//! tests and the benchmarks can use them.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use crate::device::{BlockDriver, DeviceKind, GuestAddress, PciPath, PciSlot};
use crate::device::{DeviceInfo, HostDevice};
use crate::manager::{DeviceId, DeviceManager, ManagerError};
use crate::owner::Owner;
use crate::state::{RealIo, StateIo};
use capsule_device_api::{
    AttachRequest, BackendError, BackendErrorKind, DeviceBackend, UnplugOutcome,
};

/// A fixture host under `dir`: `/sys/dev/block/7:N/uevent` and block nodes
/// `/dev/loopN` (b 7:N) for N in `0..n`, and a `/proc` where nothing is
/// mounted; returns a resolver that sees only it. Creating the nodes needs
/// root (CAP_MKNOD).
pub fn loop_host(dir: &Path, n: u32) -> io::Result<crate::Resolver> {
    let sys = dir.join("sys");
    let dev = dir.join("dev");
    let proc_self = dir.join("proc/self");
    std::fs::create_dir_all(&dev)?;
    std::fs::create_dir_all(&proc_self)?;
    std::fs::write(proc_self.join("mountinfo"), "")?;
    std::fs::write(dir.join("proc/swaps"), "Filename Type Size Used Priority\n")?;
    for i in 0..n {
        let d = sys.join(format!("dev/block/7:{i}"));
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("uevent"),
            format!("MAJOR=7\nMINOR={i}\nDEVNAME=loop{i}\nDEVTYPE=disk\n"),
        )?;
        let node = dev.join(format!("loop{i}"));
        if !node.exists() {
            nix::sys::stat::mknod(
                &node,
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                nix::sys::stat::makedev(7, i.into()),
            )?;
        }
    }
    crate::Resolver::new(crate::ResolverConfig {
        sysfs_root: sys,
        dev_root: dev,
        vhost_user_store: None,
        proc_root: dir.join("proc"),
    })
    .map_err(io::Error::other)
}

/// An OCI spec whose `linux.devices` are the block nodes `(container path,
/// loop number)` of a [`loop_host`].
pub fn loop_spec(devs: &[(&str, u32)]) -> oci_spec::runtime::Spec {
    let list: Vec<serde_json::Value> = devs
        .iter()
        .map(|(p, m)| serde_json::json!({"path": p, "type": "b", "major": 7, "minor": m}))
        .collect();
    let spec = serde_json::json!({"ociVersion": "1.0.2", "linux": {"devices": list}});
    serde_json::from_value(spec).unwrap_or_default()
}

/// The owner tests give a device they do not care to own explicitly:
/// container `c` when it carries an OCI request, the runtime otherwise.
pub fn test_owner(info: Option<&DeviceInfo>) -> Owner {
    match info {
        Some(_) => Owner::container("c"),
        None => Owner::runtime("test"),
    }
}

/// Shorthands for tests of counting and addressing, where ownership is not
/// the point: the owner comes from [`test_owner`].
pub trait ManagerTestExt {
    /// `new_device` with [`test_owner`].
    fn add(&self, dev: HostDevice) -> Result<DeviceId, ManagerError>;
    /// `remove_use` of the use with request `info` held by [`test_owner`].
    fn remove_request(
        &self,
        id: &DeviceId,
        info: Option<&DeviceInfo>,
    ) -> impl std::future::Future<Output = Result<u32, ManagerError>> + Send;
}

impl ManagerTestExt for DeviceManager {
    fn add(&self, dev: HostDevice) -> Result<DeviceId, ManagerError> {
        let owner = test_owner(dev.info.as_ref());
        self.new_device(owner, dev)
    }

    async fn remove_request(
        &self,
        id: &DeviceId,
        info: Option<&DeviceInfo>,
    ) -> Result<u32, ManagerError> {
        self.remove_use(id, &test_owner(info), info).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendOp {
    Hotplug,
    Unplug,
    Coldplug,
}

/// One call as the backend saw it, recorded when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCall {
    pub op: BackendOp,
    /// Call number, from 1.
    pub seq: u64,
    pub request: AttachRequest,
}

impl BackendCall {
    pub fn id(&self) -> &str {
        &self.request.id
    }
}

#[derive(Default)]
struct Script {
    calls: Vec<BackendCall>,
    count: u64,
    fail_seq: BTreeSet<u64>,
    fail_on: HashSet<(BackendOp, Option<String>)>,
    pending_ids: HashSet<String>,
    pending_next: u32,
    delays: Vec<(Option<BackendOp>, Option<String>, Duration)>,
    plugged: BTreeMap<String, AttachRequest>,
    anomalies: Vec<String>,
}

fn matches(filter: &(BackendOp, Option<String>), op: BackendOp, id: &str) -> bool {
    filter.0 == op && filter.1.as_deref().is_none_or(|f| f == id)
}

/// A fake hypervisor. It keeps the set of devices it has plugged and notes
/// anomalies (a device plugged twice, unplugged while absent, a generic
/// device or a request missing its addresses), which a correct manager never
/// causes. In quiet mode ([`RecordingBackend::quiet`]) it keeps nothing but a
/// call counter, for benchmarks.
pub struct RecordingBackend {
    script: Mutex<Script>,
    recording: bool,
}

impl Default for RecordingBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordingBackend {
    pub fn new() -> Self {
        Self {
            script: Mutex::new(Script::default()),
            recording: true,
        }
    }

    /// Records nothing and tracks nothing; only counts calls and honours
    /// failure injection.
    pub fn quiet() -> Self {
        Self {
            script: Mutex::new(Script::default()),
            recording: false,
        }
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<BackendCall> {
        self.script().calls.clone()
    }

    /// `(op, id)` of every call so far, in order.
    pub fn ops(&self) -> Vec<(BackendOp, String)> {
        self.script()
            .calls
            .iter()
            .map(|c| (c.op, c.request.id.clone()))
            .collect()
    }

    /// Number of calls so far (also in quiet mode).
    pub fn call_count(&self) -> u64 {
        self.script().count
    }

    pub fn clear_calls(&self) {
        self.script().calls.clear();
    }

    /// Fail call number `seq` (counted from 1 since creation).
    pub fn fail_call(&self, seq: u64) {
        self.script().fail_seq.insert(seq);
    }

    /// Fail the next call, whatever it is.
    pub fn fail_next(&self) {
        let mut s = self.script();
        let next = s.count + 1;
        s.fail_seq.insert(next);
    }

    /// Fail every `op` call for device `id` (any device when `None`) until
    /// [`clear_failures`](Self::clear_failures).
    pub fn fail_on(&self, op: BackendOp, id: Option<&str>) {
        self.script().fail_on.insert((op, id.map(str::to_owned)));
    }

    pub fn clear_failures(&self) {
        let mut s = self.script();
        s.fail_on.clear();
        s.fail_seq.clear();
    }

    /// Unplugs of `id` report [`UnplugOutcome::Pending`] until
    /// [`clear_pending`](Self::clear_pending).
    pub fn pend_unplugs_of(&self, id: &str) {
        self.script().pending_ids.insert(id.to_owned());
    }

    /// The next unplug (of any device) reports `Pending`.
    pub fn pend_next_unplug(&self) {
        self.script().pending_next += 1;
    }

    pub fn clear_pending(&self) {
        let mut s = self.script();
        s.pending_ids.clear();
        s.pending_next = 0;
    }

    /// Sleep `delay` in calls matching `op` and `id` (`None` matches all).
    pub fn set_delay(&self, op: Option<BackendOp>, id: Option<&str>, delay: Duration) {
        self.script()
            .delays
            .push((op, id.map(str::to_owned), delay));
    }

    /// The guest released `id` after an unplug that reported `Pending`
    /// (QEMU's late `DEVICE_DELETED`): it is no longer plugged.
    pub fn complete_unplug(&self, id: &str) {
        self.script().plugged.remove(id);
    }

    /// Devices currently plugged, by id, with the request that plugged them.
    pub fn plugged(&self) -> BTreeMap<String, AttachRequest> {
        self.script().plugged.clone()
    }

    /// Things a correct manager never makes the backend do.
    pub fn anomalies(&self) -> Vec<String> {
        self.script().anomalies.clone()
    }

    async fn call(
        &self,
        op: BackendOp,
        req: &AttachRequest,
    ) -> Result<Option<GuestAddress>, BackendError> {
        let (seq, fail, pending, delay) = {
            let mut s = self.script();
            s.count += 1;
            let seq = s.count;
            if self.recording {
                s.calls.push(BackendCall {
                    op,
                    seq,
                    request: req.clone(),
                });
            }
            let fail = s.fail_seq.remove(&seq) || s.fail_on.iter().any(|f| matches(f, op, &req.id));
            let mut pending = false;
            if op == BackendOp::Unplug && !fail {
                pending = s.pending_ids.contains(&req.id);
                if !pending && s.pending_next > 0 {
                    s.pending_next -= 1;
                    pending = true;
                }
            }
            let delay = s
                .delays
                .iter()
                .filter(|(o, i, _)| {
                    o.is_none_or(|o| o == op) && i.as_deref().is_none_or(|i| i == req.id)
                })
                .map(|(_, _, d)| *d)
                .max();
            (seq, fail, pending, delay)
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        if fail {
            return Err(BackendError::new(
                BackendErrorKind::Failed,
                format!("injected failure of {op:?} {} (call {seq})", req.id),
            ));
        }
        let mut s = self.script();
        if op == BackendOp::Unplug {
            if self.recording && !pending && s.plugged.remove(&req.id).is_none() {
                s.anomalies.push(format!(
                    "call {seq}: unplug of {} which is not plugged",
                    req.id
                ));
            }
            return Ok(if pending {
                None
            } else {
                Some(GuestAddress::None)
            });
        }
        let addr = address(req).map_err(|e| {
            if self.recording {
                s.anomalies.push(format!("call {seq}: {e}"));
            }
            BackendError::new(BackendErrorKind::Unsupported, e)
        })?;
        if self.recording && s.plugged.insert(req.id.clone(), req.clone()).is_some() {
            s.anomalies
                .push(format!("call {seq}: {} plugged twice", req.id));
        }
        Ok(Some(addr))
    }
}

fn pci_path(slot: u32) -> Option<PciPath> {
    PciPath::new(vec![PciSlot::new((slot % 32) as u8, 0)?])
}

/// Where a real backend would put the device, from the manager's addresses.
fn address(req: &AttachRequest) -> Result<GuestAddress, String> {
    let missing = |what: &str| {
        format!(
            "{} ({}) reached the backend without {what}",
            req.id,
            req.kind.name()
        )
    };
    let first_pci = || {
        req.pci_slots
            .first()
            .and_then(|&s| pci_path(s))
            .map(GuestAddress::Pci)
            .ok_or_else(|| missing("a PCI slot"))
    };
    let pmem = || {
        req.pmem_index
            .map(GuestAddress::Pmem)
            .ok_or_else(|| missing("a pmem index"))
    };
    match &req.kind {
        DeviceKind::Generic => Err(format!(
            "{}: generic devices never reach the backend",
            req.id
        )),
        DeviceKind::Pmem => pmem(),
        DeviceKind::Block => match req.driver {
            Some(BlockDriver::VirtioScsi) => req
                .scsi_addr
                .map(GuestAddress::Scsi)
                .ok_or_else(|| missing("a SCSI address")),
            Some(BlockDriver::VirtioBlk) => first_pci(),
            Some(BlockDriver::Nvdimm) => pmem(),
            None => Err(missing("a driver")),
        },
        DeviceKind::VhostUser { .. } | DeviceKind::Network(_) => first_pci(),
        DeviceKind::Vfio(group) => {
            if req.pci_slots.len() != group.functions.len() {
                return Err(missing("one PCI slot per function"));
            }
            req.pci_slots
                .iter()
                .map(|&s| pci_path(s))
                .collect::<Option<Vec<_>>>()
                .map(GuestAddress::Vfio)
                .ok_or_else(|| missing("valid PCI slots"))
        }
    }
}

#[async_trait]
impl DeviceBackend for RecordingBackend {
    async fn hotplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        self.call(BackendOp::Hotplug, req)
            .await
            .map(|a| a.unwrap_or(GuestAddress::None))
    }
    async fn unplug(&self, req: &AttachRequest) -> Result<UnplugOutcome, BackendError> {
        self.call(BackendOp::Unplug, req).await.map(|a| {
            if a.is_some() {
                UnplugOutcome::Removed
            } else {
                UnplugOutcome::Pending
            }
        })
    }
    async fn coldplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        self.call(BackendOp::Coldplug, req)
            .await
            .map(|a| a.unwrap_or(GuestAddress::None))
    }
}

/// The step of a state write a [`FaultyIo`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultStep {
    /// Writing the temp file: nothing is written (ENOSPC by default).
    Write,
    /// Writing the temp file: half the bytes are written, then the write
    /// fails (ENOSPC by default: the disk filled up mid-write).
    ShortWrite,
    /// fsync of the fully written temp file (EIO by default).
    SyncFile,
    /// Renaming it over the state file (EIO).
    Rename,
    /// Syncing the directory after the rename (EIO).
    SyncDir,
}

impl FaultStep {
    /// Every step, in the order a save goes through them.
    pub const ALL: [FaultStep; 5] = [
        FaultStep::Write,
        FaultStep::ShortWrite,
        FaultStep::SyncFile,
        FaultStep::Rename,
        FaultStep::SyncDir,
    ];

    /// The errno a fault at this step has unless another one is given:
    /// ENOSPC for the writes, EIO for the rest.
    pub fn default_errno(self) -> i32 {
        match self {
            FaultStep::Write | FaultStep::ShortWrite => libc::ENOSPC,
            FaultStep::SyncFile | FaultStep::Rename | FaultStep::SyncDir => libc::EIO,
        }
    }
}

#[derive(Default)]
struct FaultPlan {
    saves: u64,
    armed: BTreeMap<u64, (FaultStep, i32)>,
    /// Every save fails here until cleared.
    broken: Option<(FaultStep, i32)>,
}

/// Controls a [`FaultyIo`]; clones share the plan.
#[derive(Clone, Default)]
pub struct FaultSwitch(Arc<Mutex<FaultPlan>>);

impl FaultSwitch {
    fn plan(&self) -> MutexGuard<'_, FaultPlan> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Make the `nth` save from now (1 = the next one) fail at `step`, with
    /// the step's [default errno](FaultStep::default_errno).
    pub fn fail_save(&self, nth: u64, step: FaultStep) {
        self.fail_save_with(nth, step, step.default_errno());
    }

    /// Make the `nth` save from now fail at `step` with `errno`
    /// (`libc::ENOSPC`, `libc::EIO`, ...).
    pub fn fail_save_with(&self, nth: u64, step: FaultStep, errno: i32) {
        let mut p = self.plan();
        let at = p.saves + nth;
        p.armed.insert(at, (step, errno));
    }

    /// While set, every write fails with ENOSPC (a full disk).
    pub fn set_broken(&self, broken: bool) {
        self.plan().broken = broken.then_some((FaultStep::Write, libc::ENOSPC));
    }

    /// From now on every save fails at `step` with `errno` (a disk that
    /// stays broken), until [`clear`](Self::clear) or `set_broken(false)`.
    /// A save armed with [`fail_save`](Self::fail_save) fails as armed.
    pub fn fail_every_save(&self, step: FaultStep, errno: i32) {
        self.plan().broken = Some((step, errno));
    }

    /// Save attempts seen so far.
    pub fn saves(&self) -> u64 {
        self.plan().saves
    }

    /// Disarm everything.
    pub fn clear(&self) {
        let mut p = self.plan();
        p.armed.clear();
        p.broken = None;
    }
}

/// A [`StateIo`] over the real file system that fails where its
/// [`FaultSwitch`] says.
pub struct FaultyIo {
    switch: FaultSwitch,
    /// The step the current save fails at, with its errno.
    current: Option<(FaultStep, i32)>,
}

impl FaultyIo {
    pub fn new() -> (Self, FaultSwitch) {
        let switch = FaultSwitch::default();
        (
            Self {
                switch: switch.clone(),
                current: None,
            },
            switch,
        )
    }

    fn check(&self, step: FaultStep) -> io::Result<()> {
        match self.current {
            Some((s, errno)) if s == step => Err(io::Error::from_raw_os_error(errno)),
            _ => Ok(()),
        }
    }
}

/// Creates or truncates `path` (mode 0600) and writes `bytes`, without fsync.
fn write_unsynced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

impl StateIo for FaultyIo {
    fn write_synced(&mut self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        {
            let mut p = self.switch.plan();
            p.saves += 1;
            let n = p.saves;
            self.current = p.armed.remove(&n).or(p.broken);
        }
        self.check(FaultStep::Write)?;
        if let Some((FaultStep::ShortWrite, _)) = self.current {
            write_unsynced(path, &bytes[..bytes.len() / 2])?;
            return self.check(FaultStep::ShortWrite);
        }
        if let Some((FaultStep::SyncFile, _)) = self.current {
            write_unsynced(path, bytes)?;
            return self.check(FaultStep::SyncFile);
        }
        RealIo.write_synced(path, bytes)
    }
    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        self.check(FaultStep::Rename)?;
        RealIo.rename(from, to)
    }
    fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
        self.check(FaultStep::SyncDir)?;
        RealIo.sync_dir(dir)
    }
}

/// Builders of resolved devices for tests.
pub mod devices {
    use std::path::PathBuf;

    use crate::device::{
        Bdf, DevType, DeviceInfo, DeviceKind, HostDevice, VfioFunction, VfioGroup, VfioMode,
        VhostUserKind,
    };

    /// An OCI request for `container_path` with the given numbers.
    pub fn info(dev_type: DevType, major: u32, minor: u32, container_path: &str) -> DeviceInfo {
        DeviceInfo {
            file_mode: Some(0o660),
            uid: Some(0),
            gid: Some(0),
            ..DeviceInfo::new(container_path, dev_type, major, minor)
        }
    }

    /// Block device `b 8:<n>` at `/dev/disk<n>`, seen as `/dev/xvd<n>`.
    pub fn block(n: u32) -> HostDevice {
        HostDevice {
            info: Some(info(DevType::Block, 8, n, &format!("/dev/xvd{n}"))),
            host_path: PathBuf::from(format!("/dev/disk{n}")),
            kind: DeviceKind::Block,
        }
    }

    /// A runtime-added block device (no OCI request) backed by `path`.
    pub fn runtime_block(path: &str) -> HostDevice {
        HostDevice {
            info: None,
            host_path: path.into(),
            kind: DeviceKind::Block,
        }
    }

    /// Char device `c <major>:<minor>` (never plugged).
    pub fn char_dev(major: u32, minor: u32) -> HostDevice {
        HostDevice {
            info: Some(info(
                DevType::Char,
                major,
                minor,
                &format!("/dev/char{major}_{minor}"),
            )),
            host_path: PathBuf::from(format!("/dev/char{major}_{minor}")),
            kind: DeviceKind::Generic,
        }
    }

    /// VFIO group `group` with `pci` PCI functions and `mdevs` mediated ones.
    pub fn vfio(group: u32, pci: u8, mdevs: u8) -> HostDevice {
        let mut functions: Vec<VfioFunction> = (0..pci)
            .map(|f| VfioFunction::Pci {
                bdf: Bdf {
                    domain: 0,
                    bus: (group % 256) as u8,
                    device: 0,
                    function: f % 8,
                },
                vendor: 0x10de,
                device: 0x1234,
                class: 0x030000,
                is_pcie: true,
                large_bar: false,
            })
            .collect();
        functions.extend((0..mdevs).map(|m| VfioFunction::Mediated {
            uuid: format!("00000000-0000-0000-0000-{group:08}{m:04}"),
            sysfsdev: PathBuf::from(format!("/sys/devices/mdev{group}_{m}")),
        }));
        HostDevice {
            info: Some(info(
                DevType::Char,
                243,
                group,
                &format!("/dev/vfio/{group}"),
            )),
            host_path: PathBuf::from(format!("/dev/vfio/{group}")),
            kind: DeviceKind::Vfio(VfioGroup {
                group: group.to_string(),
                mode: VfioMode::Legacy,
                functions,
            }),
        }
    }

    /// A vhost-user device of `vhost` kind on socket `/run/vhost/<n>.sock`.
    pub fn vhost_user(vhost: VhostUserKind, n: u32) -> HostDevice {
        let socket = PathBuf::from(format!("/run/vhost/{n}.sock"));
        let (info, tag) = match vhost {
            VhostUserKind::Blk => (
                Some(info(DevType::Block, 241, n, &format!("/dev/vhost{n}"))),
                String::new(),
            ),
            VhostUserKind::Scsi => (
                Some(info(DevType::Block, 242, n, &format!("/dev/vhost{n}"))),
                String::new(),
            ),
            VhostUserKind::Fs => (None, format!("share{n}")),
            VhostUserKind::Net => (None, String::new()),
        };
        HostDevice {
            info,
            host_path: socket.clone(),
            kind: DeviceKind::VhostUser { vhost, socket, tag },
        }
    }

    /// A file exposed as nvdimm.
    pub fn pmem(n: u32) -> HostDevice {
        HostDevice {
            info: None,
            host_path: PathBuf::from(format!("/var/pmem{n}.img")),
            kind: DeviceKind::Pmem,
        }
    }
}

/// Checks a quiescent manager (no operation in flight) against every
/// invariant and against what `backend` has plugged. Returns what is wrong.
pub fn check_consistency(
    mgr: &crate::manager::DeviceManager,
    backend: &RecordingBackend,
) -> Result<(), String> {
    use crate::manager::DeviceStatus;
    let snap = mgr.snapshot();
    crate::state::validate(&snap, mgr.config())?;
    let expected: BTreeSet<String> = snap
        .devices
        .values()
        .filter(|r| !matches!(r.kind, DeviceKind::Generic))
        .filter(|r| {
            matches!(
                r.status,
                DeviceStatus::Attached | DeviceStatus::Detaching | DeviceStatus::UnplugPending
            )
        })
        .map(|r| r.id.to_string())
        .collect();
    let plugged_ids: BTreeSet<String> = backend.plugged().into_keys().collect();
    if expected != plugged_ids {
        return Err(format!(
            "manager has {expected:?} plugged, backend has {plugged_ids:?}"
        ));
    }
    let plugged = backend.plugged();
    for rec in snap.devices.values() {
        if let Some(req) = plugged.get(&rec.id.to_string()) {
            if *req != rec.request() {
                return Err(format!(
                    "{} was plugged with {req:?} but the record says {:?}",
                    rec.id,
                    rec.request()
                ));
            }
        }
    }
    let anomalies = backend.anomalies();
    if !anomalies.is_empty() {
        return Err(format!("backend anomalies: {anomalies:?}"));
    }
    Ok(())
}
