//! A container's devices as one unit: attached all or nothing at Create,
//! released together at Delete, listed from `devices.json` alone.
use std::sync::Arc;

use super::{DetachOutcome, DeviceId, DeviceManager, ManagerError};
use crate::device::{BlockDriver, DeviceInfo, DeviceKind, GuestAddress, HostDevice};
use crate::owner::Owner;
use crate::resolve::ResolvedDevices;

/// Points of a container attach or detach where the manager calls its
/// checkpoint hook (the shim's crash matrix kills itself there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// The device's use is in `devices.json`; it is not plugged yet.
    DeviceRecorded,
    /// The device's last attach was unplugged; the use is not dropped yet.
    Unplugged,
}

/// What the manager calls at each [`Checkpoint`].
pub type CheckpointHook = Arc<dyn Fn(Checkpoint) + Send + Sync>;

/// One device of a container, as attached: everything the guest agent
/// needs to find it and create its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDevice {
    pub id: DeviceId,
    /// The container's `linux.devices` entry.
    pub request: DeviceInfo,
    pub kind: DeviceKind,
    pub driver: Option<BlockDriver>,
    /// Where the guest finds it.
    pub address: GuestAddress,
}

impl DeviceManager {
    /// Attaches `devices` (resolved once, at Create) for container `cid`,
    /// in order. All or nothing: when one fails, the ones before it are
    /// detached again and the container holds nothing.
    pub async fn attach_container(
        &self,
        cid: &str,
        devices: ResolvedDevices,
    ) -> Result<Vec<ContainerDevice>, ManagerError> {
        let owner = Owner::container(cid);
        let mut done: Vec<ContainerDevice> = Vec::new();
        for dev in devices.into_vec() {
            match self.attach_one(&owner, dev).await {
                Ok(d) => done.push(d),
                Err(e) => {
                    let trouble = self.release(&owner, done.iter().rev()).await;
                    return Err(match trouble {
                        Ok(()) => e,
                        Err(t) => ManagerError::Rollback {
                            source: Box::new(e),
                            trouble: t.to_string(),
                        },
                    });
                }
            }
        }
        Ok(done)
    }

    async fn attach_one(
        &self,
        owner: &Owner,
        dev: HostDevice,
    ) -> Result<ContainerDevice, ManagerError> {
        let Some(request) = dev.info.clone() else {
            return Err(ManagerError::InvalidDevice {
                device: dev.host_path.display().to_string(),
                reason: "a container's device needs its OCI request".into(),
            });
        };
        let id = self.new_device(owner.clone(), dev)?;
        self.reached(Checkpoint::DeviceRecorded);
        let address = match self.attach(&id).await {
            Ok(a) => a,
            Err(e) => {
                return Err(match self.remove_use(&id, owner, Some(&request)).await {
                    Ok(_) => e,
                    Err(r) => ManagerError::Rollback {
                        source: Box::new(e),
                        trouble: format!("dropping its reference failed: {r}"),
                    },
                })
            }
        };
        let rec = self.get(&id).ok_or(ManagerError::UnknownDevice { id })?;
        Ok(ContainerDevice {
            id,
            request,
            kind: rec.kind,
            driver: rec.driver,
            address,
        })
    }

    /// The devices container `cid` uses, in device-id order (what
    /// `devices.json` records).
    pub fn container_devices(&self, cid: &str) -> Vec<ContainerDevice> {
        let owner = Owner::container(cid);
        let inner = self.inner();
        let mut out = Vec::new();
        for rec in inner.state.devices.values() {
            for u in rec.uses_of(&owner) {
                if let Some(request) = &u.request {
                    out.push(ContainerDevice {
                        id: rec.id,
                        request: request.clone(),
                        kind: rec.kind.clone(),
                        driver: rec.driver,
                        address: rec.guest_address.clone().unwrap_or(GuestAddress::None),
                    });
                }
            }
        }
        out
    }

    /// Drops every use container `cid` holds, newest device first: each
    /// drop detaches once (the last attach unplugs) and removes the
    /// reference. Tries every device; the uses it could not release stay
    /// recorded, so a retry (or the sandbox's teardown) finishes the job.
    /// Reports the first failure.
    pub async fn detach_container(&self, cid: &str) -> Result<(), ManagerError> {
        let owner = Owner::container(cid);
        let devices = self.container_devices(cid);
        self.release(&owner, devices.iter().rev()).await
    }

    async fn release(
        &self,
        owner: &Owner,
        devices: impl Iterator<Item = &ContainerDevice>,
    ) -> Result<(), ManagerError> {
        let mut first = None;
        for d in devices {
            if let Err(e) = self.release_one(owner, &d.id, &d.request).await {
                tracing::warn!(device = %d.id, %owner, error = %e, "releasing a device failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    async fn release_one(
        &self,
        owner: &Owner,
        id: &DeviceId,
        request: &DeviceInfo,
    ) -> Result<(), ManagerError> {
        match self.detach(id).await {
            Ok(DetachOutcome::Detached) => self.reached(Checkpoint::Unplugged),
            Ok(DetachOutcome::StillAttached { .. }) => {}
            Ok(DetachOutcome::Pending) => {
                return Err(ManagerError::Refused {
                    device: self
                        .get(id)
                        .map_or_else(|| id.to_string(), |r| r.describe()),
                    op: "detach",
                    reason: "the guest has not released it yet (unplug pending)".into(),
                })
            }
            // Not attached any more (an earlier detach went through but the
            // reference removal did not): just drop the reference.
            Err(ManagerError::Refused { .. }) => {}
            Err(e) => return Err(e),
        }
        self.remove_use(id, owner, Some(request)).await.map(|_| ())
    }

    /// Adds a device the runtime itself needs (the virtio-fs share), owned
    /// by `purpose`, and plugs it: cold-plugged into a VM that has not
    /// booted, or hot-plugged. On error nothing of it remains.
    pub async fn attach_runtime(
        &self,
        purpose: &str,
        dev: HostDevice,
        cold: bool,
    ) -> Result<(DeviceId, GuestAddress), ManagerError> {
        let owner = Owner::runtime(purpose);
        let id = self.new_device(owner.clone(), dev)?;
        let plugged = if cold {
            self.coldplug(&id).await
        } else {
            self.attach(&id).await
        };
        match plugged {
            Ok(addr) => Ok((id, addr)),
            Err(e) => Err(match self.remove_use(&id, &owner, None).await {
                Ok(_) => e,
                Err(r) => ManagerError::Rollback {
                    source: Box::new(e),
                    trouble: format!("dropping its reference failed: {r}"),
                },
            }),
        }
    }
}
