//! Unplugging: [`DeviceManager::detach`] drops an attach (the last one
//! unplugs the device and frees its addresses), and
//! [`DeviceManager::complete_pending`] settles an unplug the guest confirmed
//! late or a crash interrupted.
use capsule_device_api::{Needs, UnplugOutcome};

use super::addresses::{reclaim, reset_detached};
use super::{rec_mut, DetachOutcome, DeviceId, DeviceManager, DeviceStatus, ManagerError};
use crate::device::GuestAddress;

impl DeviceManager {
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
}
