//! What a device manager operation reports when it fails.
use capsule_device_api::BackendError;

use super::DeviceId;
use crate::alloc::AllocError;
use crate::state::StateError;

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
