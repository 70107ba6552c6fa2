//! The device manager: reference and attach counting, address allocation,
//! persistence and rollback around a [`DeviceBackend`].
//!
//! # Model
//! `new_device` adds a *reference* to a host device (deduplicated: the same
//! device twice is one record with two references); `attach`/`coldplug` add an
//! *attach*; only the first attach and the last detach reach the backend.
//! `remove` drops a reference, and refuses to leave fewer references than
//! attaches (so the last reference of an attached device cannot go), changing
//! nothing.
//!
//! # Dedupe
//! Devices are the same when their type *and* numbers match (`c 8:0` is not
//! `b 8:0`); devices without numbers (runtime-added, `0:0`) are the same when
//! kind and host path match. The record keeps every user's [`DeviceInfo`]
//! (container path, mode, owner) in `uses`, one per reference. A second use
//! that cannot share the guest device is refused with
//! [`ManagerError::Conflict`]: a different kind (another VFIO group layout,
//! another vhost-user kind) or a different read-only setting (the backend
//! opens the device once, read-only or not).
//!
//! # Persistence and failed writes
//! Every mutation is saved before it is reported. A state write that fails
//! fails the operation and undoes the in-memory change, so the file (which
//! the store replaces atomically) and memory keep agreeing; the undone state
//! is written once more, in case the failed write got as far as replacing
//! the file (a failed directory fsync). The write happens under the state
//! lock (it must not interleave with other mutations), so a store's `save`
//! should be quick; `FileStore` costs about a millisecond (two fsyncs). Before a backend
//! call the device is saved as `Attaching`/`Detaching` with its reserved
//! addresses, so after a crash the file shows what may be in flight. When the
//! hypervisor was already changed:
//! * a hotplug whose result cannot be saved is undone with an unplug (if that
//!   unplug does not complete, the device is left `UnplugPending`, keeping
//!   every address);
//! * an unplug that happened cannot be undone: memory records the truth
//!   (detached), the write is retried once, and if it still fails the error
//!   says so; the file then still shows the device in flight (never less than
//!   the VM has) until the next successful write or [`DeviceManager::persist`].
//!
//! # Concurrency
//! Operations on one device are serialised by a per-device async lock, taken
//! first. The shared state sits behind a `std::sync::Mutex` held only for
//! short sections without `.await` (including the state write); no lock is
//! held across a backend call, so a slow hotplug of one device never delays
//! another device.
mod container;
mod record;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

pub use container::{Checkpoint, CheckpointHook, ContainerDevice};
pub(crate) use record::DedupeKey;
pub use record::{DeviceId, DeviceRecord, DeviceStatus, DeviceUse, Resources};

use capsule_device_api::{BackendError, DeviceBackend, Needs, UnplugOutcome};

use crate::alloc::{AllocError, Allocators, IndexAllocator, MAX_SPACE_LEN};
use crate::device::{BlockDriver, DeviceInfo, DeviceKind, GuestAddress, HostDevice};
use crate::owner::Owner;
use crate::state::{self, SandboxState, StateError, StateStore};

/// nvdimm devices a sandbox may hold by default (QEMU memory `slots=4`).
pub const DEFAULT_PMEM_SLOTS: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerConfig {
    /// Driver for block devices created from now on.
    pub block_driver: BlockDriver,
    /// PCI slots the manager hands out: root-port numbers on q35
    /// (`0..N`), bus slot numbers on pc (`first..32`).
    pub pci_slots: Range<u32>,
    /// nvdimm indexes (`/dev/pmemN`).
    pub pmem_slots: Range<u32>,
}

impl ManagerConfig {
    pub fn new(block_driver: BlockDriver, pci_slots: Range<u32>) -> Self {
        Self {
            block_driver,
            pci_slots,
            pmem_slots: 0..DEFAULT_PMEM_SLOTS,
        }
    }
}

/// What a successful `detach` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachOutcome {
    /// The last attach went; the device is gone from the guest and its
    /// addresses are free.
    Detached,
    /// Other attaches remain; nothing reached the backend.
    StillAttached { attach_count: u32 },
    /// The unplug was requested but not confirmed: the device is
    /// `UnplugPending` and keeps its addresses. Retry `detach`, or call
    /// [`DeviceManager::complete_pending`] once the guest released it.
    Pending,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("device {id} not found")]
    UnknownDevice { id: DeviceId },
    #[error("device {device}: {reason}")]
    InvalidDevice { device: String, reason: String },
    #[error("device {device} cannot share {existing}: {reason}")]
    Conflict {
        device: String,
        existing: String,
        reason: String,
    },
    #[error("device {device}: cannot {op}: {reason}")]
    Refused {
        device: String,
        op: &'static str,
        reason: String,
    },
    #[error("device {device}: cannot {op}: {source}")]
    Exhausted {
        device: String,
        op: &'static str,
        #[source]
        source: AllocError,
    },
    #[error("device {device}: {op} failed in the hypervisor: {source}{note}")]
    Backend {
        device: String,
        op: &'static str,
        #[source]
        source: BackendError,
        /// Extra trouble while rolling back (empty when none).
        note: String,
    },
    #[error("device {device}: {op}: device state could not be saved ({detail}): {source}")]
    StateWrite {
        device: String,
        op: &'static str,
        detail: String,
        #[source]
        source: StateError,
    },
    #[error("cannot save device state to {location}: {source}")]
    Persist {
        location: String,
        #[source]
        source: StateError,
    },
    #[error("cannot load device state from {location}: {source} (the file was left untouched)")]
    Load {
        location: String,
        #[source]
        source: StateError,
    },
    #[error("device state already exists in {location}: load it instead of starting afresh")]
    StateExists { location: String },
    #[error("no device state in {location}")]
    StateMissing { location: String },
    #[error("invalid device manager configuration: {0}")]
    Config(String),
    /// A container's attach failed (`source`) and undoing the devices
    /// attached before it failed too.
    #[error("{source}; rolling back the devices attached before failed: {trouble}")]
    Rollback {
        #[source]
        source: Box<ManagerError>,
        trouble: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlugMode {
    Hot,
    Cold,
}

impl PlugMode {
    fn op(self) -> &'static str {
        match self {
            PlugMode::Hot => "attach",
            PlugMode::Cold => "cold-plug",
        }
    }
}

type OpLock = Arc<tokio::sync::Mutex<()>>;

struct Inner {
    state: SandboxState,
    dedupe: HashMap<DedupeKey, DeviceId>,
    ops: HashMap<DeviceId, OpLock>,
    store: Box<dyn StateStore>,
}

impl Inner {
    fn describe(&self, id: &DeviceId) -> String {
        self.state
            .devices
            .get(id)
            .map_or_else(|| id.to_string(), DeviceRecord::describe)
    }

    /// Saves; on failure runs `revert`, so memory is back to what the file
    /// held, and writes that again in case the failed write got as far as
    /// replacing the file (a failed directory fsync).
    fn commit(&mut self, revert: impl FnOnce(&mut Inner)) -> Result<(), StateError> {
        let result = self.store.save(&self.state);
        if result.is_err() {
            revert(self);
            if let Err(e) = self.store.save(&self.state) {
                tracing::debug!(error = %e, "rewriting the previous device state failed as well");
            }
        }
        result
    }

    /// Saves a change that cannot be undone (the hypervisor already acted);
    /// retried once.
    fn save_truth(&mut self) -> Result<(), StateError> {
        self.store.save(&self.state).or_else(|e| {
            tracing::warn!(error = %e, "device state write failed; retrying once");
            self.store.save(&self.state)
        })
    }

    fn state_write(
        &self,
        id: &DeviceId,
        op: &'static str,
        detail: &str,
        source: StateError,
    ) -> ManagerError {
        ManagerError::StateWrite {
            device: self.describe(id),
            op,
            detail: detail.into(),
            source,
        }
    }
}

fn rec_mut<'a>(
    devices: &'a mut BTreeMap<DeviceId, DeviceRecord>,
    id: &DeviceId,
) -> Result<&'a mut DeviceRecord, ManagerError> {
    devices
        .get_mut(id)
        .ok_or(ManagerError::UnknownDevice { id: *id })
}

/// Frees everything `rec` holds and marks it detached.
fn reset_detached(rec: &mut DeviceRecord, alloc: &mut Allocators) {
    release(alloc, &std::mem::take(&mut rec.resources), rec.id);
    rec.status = DeviceStatus::Detached;
    rec.attach_count = 0;
    rec.guest_address = None;
}

fn release(alloc: &mut Allocators, res: &Resources, id: DeviceId) {
    for_each_address(alloc, res, id, "release", IndexAllocator::free);
}

/// Takes back exactly `res` (undoing a [`release`] whose save failed).
fn reclaim(alloc: &mut Allocators, res: &Resources, id: DeviceId) {
    for_each_address(alloc, res, id, "reclaim", IndexAllocator::reserve);
}

/// Applies `op` to every address `res` holds in its allocator. Failures
/// cannot happen while the allocators match the records (checked on load,
/// kept by every operation); they are logged, never acted on twice.
fn for_each_address(
    alloc: &mut Allocators,
    res: &Resources,
    id: DeviceId,
    what: &str,
    op: fn(&mut IndexAllocator, u32) -> Result<(), AllocError>,
) {
    let held = [
        (&mut alloc.block, res.block_index),
        (&mut alloc.pmem, res.pmem_index),
    ];
    for (space, index) in held {
        if let Some(Err(e)) = index.map(|i| op(space, i)) {
            tracing::error!(device = %id, error = %e, "address {what} failed");
        }
    }
    for &slot in &res.pci_slots {
        if let Err(e) = op(&mut alloc.pci, slot) {
            tracing::error!(device = %id, error = %e, "address {what} failed");
        }
    }
}

/// Allocates what `plan` needs, all or nothing.
fn allocate(alloc: &mut Allocators, plan: Needs, id: DeviceId) -> Result<Resources, AllocError> {
    fn take(alloc: &mut Allocators, plan: Needs, res: &mut Resources) -> Result<(), AllocError> {
        if plan.block {
            res.block_index = Some(alloc.block.alloc()?);
        }
        if plan.pmem {
            res.pmem_index = Some(alloc.pmem.alloc()?);
        }
        res.pci_slots = alloc.pci.alloc_many(plan.pci_slots)?;
        Ok(())
    }
    let mut res = Resources::default();
    match take(alloc, plan, &mut res) {
        Ok(()) => Ok(res),
        Err(e) => {
            release(alloc, &res, id);
            Err(e)
        }
    }
}

fn use_read_only(info: &Option<DeviceInfo>) -> bool {
    info.as_ref().is_some_and(|i| i.read_only)
}

/// A sandbox's devices. `Send + Sync`; share it with `Arc`.
pub struct DeviceManager {
    config: ManagerConfig,
    backend: Arc<dyn DeviceBackend>,
    inner: Mutex<Inner>,
    checkpoint: Option<CheckpointHook>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl DeviceManager {
    /// A manager for a new sandbox. Refuses a store that already holds state
    /// (use [`DeviceManager::load`]) and writes the empty state at once.
    /// A stored state that is exactly the empty one is what an interrupted
    /// `new` leaves (its directory fsync failed after the rename): it holds
    /// nothing to lose, so a retry takes it over.
    pub fn new(
        config: ManagerConfig,
        backend: Arc<dyn DeviceBackend>,
        store: impl StateStore + 'static,
    ) -> Result<Self, ManagerError> {
        check_config(&config)?;
        let mut store: Box<dyn StateStore> = Box::new(store);
        let location = store.location();
        let state = SandboxState::new(&config);
        match store.load() {
            Ok(None) => {}
            Ok(Some(bytes)) if state::decode(&bytes, &config).ok().as_ref() == Some(&state) => {
                tracing::info!(%location, "taking over the empty device state of an interrupted start");
            }
            Ok(Some(_)) => return Err(ManagerError::StateExists { location }),
            Err(source) => return Err(ManagerError::Load { location, source }),
        }
        store
            .save(&state)
            .map_err(|source| ManagerError::Persist { location, source })?;
        Ok(Self::from_state(config, backend, store, state))
    }

    /// Recreates the manager saved in `store`: devices, counts, addresses and
    /// ids exactly as they were. A file that is malformed, from a newer
    /// version or inconsistent is refused, and nothing is written.
    pub fn load(
        config: ManagerConfig,
        backend: Arc<dyn DeviceBackend>,
        store: impl StateStore + 'static,
    ) -> Result<Self, ManagerError> {
        check_config(&config)?;
        let mut store: Box<dyn StateStore> = Box::new(store);
        let location = store.location();
        let bytes = match store.load() {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err(ManagerError::StateMissing { location }),
            Err(source) => return Err(ManagerError::Load { location, source }),
        };
        let state = state::decode(&bytes, &config)
            .map_err(|source| ManagerError::Load { location, source })?;
        Ok(Self::from_state(config, backend, store, state))
    }

    fn from_state(
        config: ManagerConfig,
        backend: Arc<dyn DeviceBackend>,
        store: Box<dyn StateStore>,
        state: SandboxState,
    ) -> Self {
        // `decode` checked that no two records share a key.
        let dedupe = state
            .devices
            .values()
            .map(|r| (DedupeKey::of_record(r), r.id))
            .collect();
        let ops = state
            .devices
            .keys()
            .map(|id| (*id, OpLock::default()))
            .collect();
        Self {
            config,
            backend,
            inner: Mutex::new(Inner {
                state,
                dedupe,
                ops,
                store,
            }),
            checkpoint: None,
        }
    }

    /// Calls `hook` at the [`Checkpoint`]s of container attach and detach
    /// (the shim's crash-matrix fault points).
    pub fn with_checkpoints(mut self, hook: CheckpointHook) -> Self {
        self.checkpoint = Some(hook);
        self
    }

    fn reached(&self, c: Checkpoint) {
        if let Some(h) = &self.checkpoint {
            h(c);
        }
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Every section under this lock leaves the state consistent before
        // any call that could panic, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn op_lock(&self, id: &DeviceId) -> Result<OpLock, ManagerError> {
        self.inner()
            .ops
            .get(id)
            .cloned()
            .ok_or(ManagerError::UnknownDevice { id: *id })
    }

    /// Adds a reference to `dev` held by `owner`, creating its record unless
    /// the same device is already known (see the module docs for what
    /// "same" means and which differences are refused). A container's use
    /// carries its OCI request (`dev.info`), the runtime's uses carry none.
    pub fn new_device(&self, owner: Owner, dev: HostDevice) -> Result<DeviceId, ManagerError> {
        let describe_new = || record::describe(None, &dev.kind, &dev.host_path, dev.info.as_ref());
        if owner.is_container() != dev.info.is_some() {
            return Err(ManagerError::InvalidDevice {
                device: describe_new(),
                reason: format!(
                    "a use by {owner} must {} an OCI request",
                    if owner.is_container() {
                        "carry"
                    } else {
                        "not carry"
                    }
                ),
            });
        }
        if let DeviceKind::Vfio(group) = &dev.kind {
            if group.functions.is_empty() {
                return Err(ManagerError::InvalidDevice {
                    device: describe_new(),
                    reason: format!("VFIO group {} has no functions", group.group),
                });
            }
        }
        let key = DedupeKey::of(&dev.kind, &dev.host_path, dev.info.as_ref());
        let mut guard = self.inner();
        let inner = &mut *guard;
        if let Some(&id) = inner.dedupe.get(&key) {
            let rec = rec_mut(&mut inner.state.devices, &id)?;
            let conflict = if rec.kind != dev.kind {
                Some(format!(
                    "it is the same device as a {} device",
                    rec.kind.name()
                ))
            } else if rec.read_only() != use_read_only(&dev.info) {
                let (have, want) = if rec.read_only() {
                    ("read-only", "read-write")
                } else {
                    ("read-write", "read-only")
                };
                Some(format!(
                    "it is already used {have}; a {want} use needs a device of its own"
                ))
            } else {
                None
            };
            if let Some(reason) = conflict {
                return Err(ManagerError::Conflict {
                    device: describe_new(),
                    existing: rec.describe(),
                    reason,
                });
            }
            rec.uses.push(DeviceUse::new(owner, dev.info));
            inner
                .commit(|i| {
                    if let Some(r) = i.state.devices.get_mut(&id) {
                        r.uses.pop();
                    }
                })
                .map_err(|e| inner.state_write(&id, "add a reference", "reference not added", e))?;
            return Ok(id);
        }
        let id = DeviceId(inner.state.next_id);
        let Some(next_id) = id.0.checked_add(1) else {
            return Err(ManagerError::InvalidDevice {
                device: describe_new(),
                reason: "device ids exhausted".into(),
            });
        };
        let driver = matches!(dev.kind, DeviceKind::Block).then_some(self.config.block_driver);
        let rec = DeviceRecord {
            id,
            host_path: dev.host_path,
            kind: dev.kind,
            driver,
            uses: vec![DeviceUse::new(owner, dev.info)],
            attach_count: 0,
            status: DeviceStatus::Detached,
            resources: Resources::default(),
            guest_address: None,
        };
        inner.state.devices.insert(id, rec);
        inner.state.next_id = next_id;
        inner.dedupe.insert(key.clone(), id);
        inner.ops.insert(id, OpLock::default());
        let mut dropped = None;
        inner
            .commit(|i| {
                dropped = i.state.devices.remove(&id);
                i.state.next_id = id.0;
                i.dedupe.remove(&key);
                i.ops.remove(&id);
            })
            .map_err(|source| ManagerError::StateWrite {
                device: dropped
                    .as_ref()
                    .map_or_else(|| id.to_string(), DeviceRecord::describe),
                op: "create",
                detail: "device not created".into(),
                source,
            })?;
        Ok(id)
    }

    /// Hot-plugs the device into the running VM (first attach) or counts
    /// another attach. Returns where the guest finds it.
    pub async fn attach(&self, id: &DeviceId) -> Result<GuestAddress, ManagerError> {
        self.plug(id, PlugMode::Hot).await
    }

    /// Adds the device to the configuration of a VM that has not booted.
    /// Counted like `attach`.
    pub async fn coldplug(&self, id: &DeviceId) -> Result<GuestAddress, ManagerError> {
        self.plug(id, PlugMode::Cold).await
    }

    async fn plug(&self, id: &DeviceId, mode: PlugMode) -> Result<GuestAddress, ManagerError> {
        let op = mode.op();
        let lock = self.op_lock(id)?;
        let _serial = lock.lock().await;

        // Phase 1: count, or reserve addresses and save `Attaching`.
        let req = {
            let mut guard = self.inner();
            let inner = &mut *guard;
            let rec = rec_mut(&mut inner.state.devices, id)?;
            match rec.status {
                DeviceStatus::Detached => {}
                DeviceStatus::Attached => {
                    if rec.attach_count >= rec.ref_count() {
                        return Err(ManagerError::Refused {
                            device: rec.describe(),
                            op,
                            reason: format!(
                                "already attached {} time(s) for {} reference(s); add a reference first",
                                rec.attach_count,
                                rec.ref_count()
                            ),
                        });
                    }
                    rec.attach_count += 1;
                    let addr = rec.guest_address.clone().unwrap_or(GuestAddress::None);
                    inner
                        .commit(|i| {
                            if let Some(r) = i.state.devices.get_mut(id) {
                                r.attach_count -= 1;
                            }
                        })
                        .map_err(|e| inner.state_write(id, op, "attach not counted", e))?;
                    return Ok(addr);
                }
                status => {
                    return Err(ManagerError::Refused {
                        device: rec.describe(),
                        op,
                        reason: format!("it is {status}; detach it or call complete_pending first"),
                    })
                }
            }
            let plan = Needs::of(&rec.kind, rec.driver);
            if plan.generic {
                rec.status = DeviceStatus::Attached;
                rec.attach_count = 1;
                rec.guest_address = Some(GuestAddress::None);
                inner
                    .commit(|i| {
                        if let Some(r) = i.state.devices.get_mut(id) {
                            r.status = DeviceStatus::Detached;
                            r.attach_count = 0;
                            r.guest_address = None;
                        }
                    })
                    .map_err(|e| inner.state_write(id, op, "attach not counted", e))?;
                return Ok(GuestAddress::None);
            }
            let resources = allocate(&mut inner.state.allocators, plan, *id).map_err(|source| {
                ManagerError::Exhausted {
                    device: rec.describe(),
                    op,
                    source,
                }
            })?;
            rec.resources = resources;
            rec.status = DeviceStatus::Attaching;
            let req = rec.request();
            inner
                .commit(|i| {
                    if let Some(r) = i.state.devices.get_mut(id) {
                        reset_detached(r, &mut i.state.allocators);
                    }
                })
                .map_err(|e| inner.state_write(id, op, "nothing was attached", e))?;
            req
        };

        // Phase 2: the backend, with no lock but this device's.
        let result = match mode {
            PlugMode::Hot => self.backend.hotplug(&req).await,
            PlugMode::Cold => self.backend.coldplug(&req).await,
        };

        // Phase 3: record the result.
        let save_error = {
            let mut guard = self.inner();
            let inner = &mut *guard;
            let rec = rec_mut(&mut inner.state.devices, id)?;
            match result {
                Err(source) => {
                    reset_detached(rec, &mut inner.state.allocators);
                    let note = match inner.save_truth() {
                        Ok(()) => String::new(),
                        Err(e) => format!("; saving the rollback failed too (the state file still shows the attach in flight): {e}"),
                    };
                    return Err(ManagerError::Backend {
                        device: inner.describe(id),
                        op,
                        source,
                        note,
                    });
                }
                Ok(addr) => {
                    rec.status = DeviceStatus::Attached;
                    rec.attach_count = 1;
                    rec.guest_address = Some(addr.clone());
                    match inner.store.save(&inner.state) {
                        Ok(()) => return Ok(addr),
                        Err(e) => {
                            if let Some(r) = inner.state.devices.get_mut(id) {
                                r.status = DeviceStatus::Attaching;
                                r.attach_count = 0;
                            }
                            e
                        }
                    }
                }
            }
        };

        // The VM has the device but the state cannot say so: take it out.
        let undo = self.backend.unplug(&req).await;
        let mut guard = self.inner();
        let inner = &mut *guard;
        let rec = rec_mut(&mut inner.state.devices, id)?;
        let mut detail = match undo {
            Ok(UnplugOutcome::Removed) => {
                reset_detached(rec, &mut inner.state.allocators);
                "the device was unplugged again".to_string()
            }
            outcome => {
                rec.status = DeviceStatus::UnplugPending;
                rec.attach_count = 1;
                match outcome {
                    Err(e) => {
                        format!("unplugging it again failed ({e}); it is left unplug-pending")
                    }
                    Ok(_) => "unplugging it again is pending; it is left unplug-pending".into(),
                }
            }
        };
        if let Err(e) = inner.save_truth() {
            detail.push_str(&format!("; saving that failed too: {e}"));
        }
        Err(inner.state_write(id, op, &detail, save_error))
    }

    /// Drops one attach. The last one unplugs the device and frees its
    /// addresses; on a backend error the device stays attached with
    /// everything it holds. Also retries the unplug of an `UnplugPending`
    /// device, or of one whose attach/detach was interrupted by a crash.
    pub async fn detach(&self, id: &DeviceId) -> Result<DetachOutcome, ManagerError> {
        const OP: &str = "detach";
        let lock = self.op_lock(id)?;
        let _serial = lock.lock().await;

        let (req, previous) = {
            let mut guard = self.inner();
            let inner = &mut *guard;
            let rec = rec_mut(&mut inner.state.devices, id)?;
            let previous = rec.status;
            match previous {
                DeviceStatus::Detached => {
                    return Err(ManagerError::Refused {
                        device: rec.describe(),
                        op: OP,
                        reason: "it is not attached".into(),
                    })
                }
                DeviceStatus::Attached if rec.attach_count > 1 => {
                    rec.attach_count -= 1;
                    let attach_count = rec.attach_count;
                    inner
                        .commit(|i| {
                            if let Some(r) = i.state.devices.get_mut(id) {
                                r.attach_count += 1;
                            }
                        })
                        .map_err(|e| inner.state_write(id, OP, "still attached", e))?;
                    return Ok(DetachOutcome::StillAttached { attach_count });
                }
                DeviceStatus::Attached if Needs::of(&rec.kind, rec.driver).generic => {
                    rec.status = DeviceStatus::Detached;
                    rec.attach_count = 0;
                    rec.guest_address = None;
                    inner
                        .commit(|i| {
                            if let Some(r) = i.state.devices.get_mut(id) {
                                r.status = DeviceStatus::Attached;
                                r.attach_count = 1;
                                r.guest_address = Some(GuestAddress::None);
                            }
                        })
                        .map_err(|e| inner.state_write(id, OP, "still attached", e))?;
                    return Ok(DetachOutcome::Detached);
                }
                DeviceStatus::Attaching => {
                    // An attach interrupted by a crash: already saved as in
                    // flight; nothing to record before the unplug.
                    (rec.request(), previous)
                }
                DeviceStatus::Attached | DeviceStatus::Detaching | DeviceStatus::UnplugPending => {
                    rec.status = DeviceStatus::Detaching;
                    let req = rec.request();
                    inner
                        .commit(|i| {
                            if let Some(r) = i.state.devices.get_mut(id) {
                                r.status = previous;
                            }
                        })
                        .map_err(|e| inner.state_write(id, OP, "still attached", e))?;
                    (req, previous)
                }
            }
        };

        let result = self.backend.unplug(&req).await;

        let mut guard = self.inner();
        let inner = &mut *guard;
        let rec = rec_mut(&mut inner.state.devices, id)?;
        match result {
            Ok(UnplugOutcome::Removed) => {
                reset_detached(rec, &mut inner.state.allocators);
                inner.save_truth().map_err(|e| {
                    inner.state_write(id, OP, "the device was unplugged and is detached; the state file still shows it in flight", e)
                })?;
                Ok(DetachOutcome::Detached)
            }
            Ok(UnplugOutcome::Pending) => {
                if previous != DeviceStatus::Attaching {
                    rec.status = DeviceStatus::UnplugPending;
                }
                inner.save_truth().map_err(|e| {
                    inner.state_write(
                        id,
                        OP,
                        "the unplug is pending and the device keeps its addresses",
                        e,
                    )
                })?;
                Ok(DetachOutcome::Pending)
            }
            Err(source) => {
                rec.status = previous;
                let note = match inner.save_truth() {
                    Ok(()) => String::new(),
                    Err(e) => format!("; saving the rollback failed too (the state file shows the detach in flight): {e}"),
                };
                Err(ManagerError::Backend {
                    device: inner.describe(id),
                    op: OP,
                    source,
                    note,
                })
            }
        }
    }

    /// Declares that a device whose unplug is pending (or whose attach or
    /// detach was interrupted by a crash) is gone from the guest, e.g. after
    /// a late `DEVICE_DELETED`: frees its addresses and marks it detached.
    pub async fn complete_pending(&self, id: &DeviceId) -> Result<(), ManagerError> {
        const OP: &str = "complete a pending unplug";
        let lock = self.op_lock(id)?;
        let _serial = lock.lock().await;
        let mut guard = self.inner();
        let inner = &mut *guard;
        let rec = rec_mut(&mut inner.state.devices, id)?;
        if !matches!(
            rec.status,
            DeviceStatus::UnplugPending | DeviceStatus::Attaching | DeviceStatus::Detaching
        ) {
            return Err(ManagerError::Refused {
                device: rec.describe(),
                op: OP,
                reason: format!("it is {}, not pending", rec.status),
            });
        }
        let before = rec.clone();
        reset_detached(rec, &mut inner.state.allocators);
        inner
            .commit(|i| {
                reclaim(&mut i.state.allocators, &before.resources, before.id);
                i.state.devices.insert(before.id, before);
            })
            .map_err(|e| inner.state_write(id, OP, "still pending", e))
    }

    /// Drops the newest reference. Refused, changing nothing, when the
    /// remaining references would be fewer than the attaches (detach first),
    /// or when the last reference of a device in flight would go. Returns the
    /// remaining reference count; at 0 the record is gone.
    pub async fn remove(&self, id: &DeviceId) -> Result<u32, ManagerError> {
        self.remove_where(id, |_| true, "").await
    }

    /// Like [`remove`](Self::remove), dropping the reference `owner` holds
    /// with request `info` (the newest such one).
    pub async fn remove_use(
        &self,
        id: &DeviceId,
        owner: &Owner,
        info: Option<&DeviceInfo>,
    ) -> Result<u32, ManagerError> {
        let what = match info {
            Some(i) => format!(" of {owner} used as {}", i.container_path.display()),
            None => format!(" of {owner}"),
        };
        self.remove_where(
            id,
            |u| &u.owner == owner && u.request.as_ref() == info,
            &what,
        )
        .await
    }

    async fn remove_where(
        &self,
        id: &DeviceId,
        matches: impl Fn(&DeviceUse) -> bool,
        what: &str,
    ) -> Result<u32, ManagerError> {
        const OP: &str = "remove";
        let lock = self.op_lock(id)?;
        let _serial = lock.lock().await;
        let mut guard = self.inner();
        let inner = &mut *guard;
        let rec = rec_mut(&mut inner.state.devices, id)?;
        let Some(pos) = rec.uses.iter().rposition(matches) else {
            return Err(ManagerError::Refused {
                device: rec.describe(),
                op: OP,
                reason: format!("it has no reference{what}"),
            });
        };
        let remaining = rec.ref_count() - 1;
        if remaining < rec.attach_count {
            return Err(ManagerError::Refused {
                device: rec.describe(),
                op: OP,
                reason: format!(
                    "it is attached {} time(s) and would keep only {remaining} reference(s); detach first",
                    rec.attach_count
                ),
            });
        }
        if remaining == 0 && rec.status != DeviceStatus::Detached {
            return Err(ManagerError::Refused {
                device: rec.describe(),
                op: OP,
                reason: format!(
                    "it is {}; detach it or call complete_pending first",
                    rec.status
                ),
            });
        }
        let removed = rec.uses.remove(pos);
        if remaining > 0 {
            inner
                .commit(|i| {
                    if let Some(r) = i.state.devices.get_mut(id) {
                        r.uses.insert(pos, removed);
                    }
                })
                .map_err(|e| inner.state_write(id, OP, "reference kept", e))?;
            return Ok(remaining);
        }
        let Some(mut rec) = inner.state.devices.remove(id) else {
            return Err(ManagerError::UnknownDevice { id: *id });
        };
        let key = DedupeKey::of(&rec.kind, &rec.host_path, removed.request.as_ref());
        inner.dedupe.remove(&key);
        let op_lock = inner.ops.remove(id);
        rec.uses.push(removed);
        inner
            .commit(move |i| {
                i.dedupe.insert(key, rec.id);
                if let Some(l) = op_lock {
                    i.ops.insert(rec.id, l);
                }
                i.state.devices.insert(rec.id, rec);
            })
            .map_err(|e| inner.state_write(id, OP, "reference kept", e))?;
        Ok(0)
    }

    /// A copy of the device's record.
    pub fn get(&self, id: &DeviceId) -> Option<DeviceRecord> {
        self.inner().state.devices.get(id).cloned()
    }

    /// Every device, in id order.
    pub fn list(&self) -> Vec<DeviceRecord> {
        self.inner().state.devices.values().cloned().collect()
    }

    /// Devices some user sees at `path` inside a container.
    pub fn find_by_container_path(&self, path: &Path) -> Vec<DeviceRecord> {
        let inner = self.inner();
        inner
            .state
            .devices
            .values()
            .filter(|r| r.container_paths().any(|p| p == path))
            .cloned()
            .collect()
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.inner().state.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything the manager persists; equal for a manager and its reload.
    pub fn snapshot(&self) -> SandboxState {
        self.inner().state.clone()
    }

    /// Writes the current state again (after an error reported that the
    /// file lags behind memory).
    pub fn persist(&self) -> Result<(), ManagerError> {
        let mut inner = self.inner();
        let inner = &mut *inner;
        inner
            .store
            .save(&inner.state)
            .map_err(|source| ManagerError::Persist {
                location: inner.store.location(),
                source,
            })
    }
}

fn check_config(config: &ManagerConfig) -> Result<(), ManagerError> {
    for (name, r) in [
        ("pci_slots", &config.pci_slots),
        ("pmem_slots", &config.pmem_slots),
    ] {
        if r.start > r.end {
            return Err(ManagerError::Config(format!(
                "{name} range {r:?} is reversed"
            )));
        }
        if r.end - r.start > MAX_SPACE_LEN {
            return Err(ManagerError::Config(format!(
                "{name} range {r:?} is longer than {MAX_SPACE_LEN}"
            )));
        }
    }
    Ok(())
}
