//! References: [`DeviceManager::new_device`] adds one (a new record, or one
//! more use of the same device), [`DeviceManager::remove`] and
//! [`DeviceManager::remove_use`] drop one.
use super::record;
use super::{
    rec_mut, DedupeKey, DeviceId, DeviceManager, DeviceRecord, DeviceStatus, DeviceUse,
    ManagerError, OpLock, Resources,
};
use crate::device::{DeviceInfo, DeviceKind, HostDevice};
use crate::owner::Owner;

fn use_read_only(info: &Option<DeviceInfo>) -> bool {
    info.as_ref().is_some_and(|i| i.read_only)
}

impl DeviceManager {
    /// Adds a reference to `dev` held by `owner`, creating its record unless
    /// the same device is already known (see the `manager` module docs for
    /// what "same" means and which differences are refused). A container's
    /// use carries its OCI request (`dev.info`), the runtime's uses carry
    /// none.
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
}
