//! Plugging: [`DeviceManager::attach`] (hotplug into the running VM) and
//! [`DeviceManager::coldplug`] (into a VM that has not booted). Only the
//! first attach reaches the backend; later ones are counted.
use capsule_device_api::{Needs, UnplugOutcome};

use super::addresses::{allocate, reset_detached};
use super::{rec_mut, DeviceId, DeviceManager, DeviceStatus, ManagerError};
use crate::device::GuestAddress;

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

impl DeviceManager {
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
}
