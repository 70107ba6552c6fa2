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
//! kind and host path match. The record keeps every user's
//! [`DeviceInfo`](crate::device::DeviceInfo) (container path, mode, owner)
//! in `uses`, one per reference. A second use that cannot share the guest
//! device is refused with [`ManagerError::Conflict`]: a different kind
//! (another VFIO group layout, another vhost-user kind) or a different
//! read-only setting (the backend opens the device once, read-only or not).
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
//!
//! # Layout
//! This file holds the configuration, construction and loading, the queries
//! and the state-write discipline (`Inner::commit`); the operations are
//! further `impl DeviceManager` blocks: `references` (`new_device`,
//! `remove`), `plug` (`attach`, `coldplug`), `unplug` (`detach`,
//! `complete_pending`) and `container` (a container's devices as one unit).
//! `addresses` takes and frees a record's guest addresses, `record` is the
//! persisted per-device record and `error` the [`ManagerError`] every
//! operation reports.
mod addresses;
mod container;
mod error;
mod plug;
mod record;
mod references;
mod unplug;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

pub use container::{Checkpoint, CheckpointHook, ContainerDevice};
pub use error::ManagerError;
pub(crate) use record::DedupeKey;
pub use record::{DeviceId, DeviceRecord, DeviceStatus, DeviceUse, Resources};

use capsule_device_api::DeviceBackend;

use crate::alloc::MAX_SPACE_LEN;
use crate::device::BlockDriver;
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
