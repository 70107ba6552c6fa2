//! The backend trait. The device manager decides *what* to attach and owns
//! every address (see [`crate::needs`]); a backend makes it happen and
//! reports where the guest will find it. Nothing here knows about QEMU.
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::kind::{BlockDriver, DeviceKind, GuestAddress};
use crate::needs::Needs;
use crate::ScsiAddr;

/// Everything a backend needs to plug one device. Built by the manager from
/// its record; ids and addresses are already allocated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    /// Manager id, stable for the device's lifetime (`dev7`). Backends derive
    /// their own object names from it and use it as the disk serial.
    pub id: String,
    pub kind: DeviceKind,
    pub host_path: PathBuf,
    pub read_only: bool,
    /// Block driver (block devices only).
    pub driver: Option<BlockDriver>,
    /// Block index (block and vhost-user-blk/scsi devices).
    pub block_index: Option<u32>,
    /// Predicted virtio drive name (`vdb`); informational only.
    pub drive_name: Option<String>,
    pub scsi_addr: Option<ScsiAddr>,
    pub pmem_index: Option<u32>,
    /// Allocated PCI slots (root port or bus slot numbers), exactly one per
    /// PCI function the device needs ([`Needs::pci_slots`]).
    pub pci_slots: Vec<u32>,
}

impl AttachRequest {
    /// What the device needs from the machine.
    pub fn needs(&self) -> Needs {
        Needs::of(&self.kind, self.driver)
    }

    /// Refuses a request that does not carry the PCI slots its kind needs:
    /// backends never choose addresses themselves.
    pub fn check_slots(&self) -> Result<(), BackendError> {
        let need = self.needs().pci_slots;
        if self.pci_slots.len() == need {
            return Ok(());
        }
        Err(BackendError::new(
            BackendErrorKind::Failed,
            format!(
                "device {}: a {} device needs {need} allocated PCI slot(s), the request carries {}",
                self.id,
                self.kind.name(),
                self.pci_slots.len()
            ),
        ))
    }
}

/// Result of an unplug request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnplugOutcome {
    /// The guest released the device and every backend object is gone.
    Removed,
    /// The unplug was requested but not acknowledged in time: the device may
    /// still be in use, so nothing it holds may be freed yet.
    Pending,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// The hypervisor refused or failed the operation.
    Failed,
    /// No answer in time.
    Timeout,
    /// The backend does not support this for the device (for example
    /// nvdimm hot-unplug, or vhost-user without shared memory).
    Unsupported,
}

/// A backend failure. The backend has already undone whatever it added for
/// this request before returning it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub kind: BackendErrorKind,
    pub message: String,
}

impl BackendError {
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// A hypervisor as the device manager sees it.
#[async_trait]
pub trait DeviceBackend: Send + Sync {
    /// Plug into a running VM. On error nothing of the request remains.
    async fn hotplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError>;
    /// Unplug from a running VM.
    async fn unplug(&self, req: &AttachRequest) -> Result<UnplugOutcome, BackendError>;
    /// Add to the configuration of a VM that has not booted yet.
    async fn coldplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError>;
}
