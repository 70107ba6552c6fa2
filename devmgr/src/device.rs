//! The device model on the manager's side: what a container asked for
//! ([`DeviceInfo`]) and what it is on the host ([`HostDevice`]). What a
//! device *is* for the VM (its kind, driver, guest address) comes from the
//! seam crate `capsule-device-api` and is re-exported here. These types are
//! persisted (see `state`), so every field change is a state-format change.
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use capsule_device_api::kind::{
    Bdf, BlockDriver, DeviceKind, GuestAddress, NetEndpoint, VfioFunction, VfioGroup, VfioMode,
    VhostUserKind,
};
pub use capsule_device_api::{PciPath, PciSlot, ScsiAddr};

/// Highest major number Linux encodes in a `dev_t` (12 bits).
pub const MAX_MAJOR: u32 = (1 << 12) - 1;
/// Highest minor number Linux encodes in a `dev_t` (20 bits).
pub const MAX_MINOR: u32 = (1 << 20) - 1;

/// OCI device type: `b`, `c`, `u` (unbuffered char) or `p` (fifo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DevType {
    #[serde(rename = "b")]
    Block,
    #[serde(rename = "c")]
    Char,
    #[serde(rename = "u")]
    CharUnbuffered,
    #[serde(rename = "p")]
    Fifo,
}

impl DevType {
    /// The `/sys/dev/<dir>` holding this type's numbers (`None` for fifos).
    pub fn sysfs_dir(self) -> Option<&'static str> {
        match self {
            DevType::Block => Some("block"),
            DevType::Char | DevType::CharUnbuffered => Some("char"),
            DevType::Fifo => None,
        }
    }
    pub fn as_char(self) -> char {
        match self {
            DevType::Block => 'b',
            DevType::Char => 'c',
            DevType::CharUnbuffered => 'u',
            DevType::Fifo => 'p',
        }
    }
}

impl fmt::Display for DevType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// A validated OCI `linux.devices` entry with its cgroup access folded in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    /// Absolute, normalised path inside the container.
    pub container_path: PathBuf,
    pub dev_type: DevType,
    pub major: u32,
    pub minor: u32,
    /// Permission bits for the node in the container (`fileMode`).
    pub file_mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// True when the matching cgroup rule lacks `w`.
    pub read_only: bool,
    /// Access string of the matching cgroup rule (`"rwm"` when none matched).
    pub cgroup_access: String,
}

impl DeviceInfo {
    /// A request for `container_path` with the given numbers and OCI
    /// defaults: no mode or owner given, writable, cgroup access `rwm`.
    pub fn new(
        container_path: impl Into<PathBuf>,
        dev_type: DevType,
        major: u32,
        minor: u32,
    ) -> Self {
        Self {
            container_path: container_path.into(),
            dev_type,
            major,
            minor,
            file_mode: None,
            uid: None,
            gid: None,
            read_only: false,
            cgroup_access: "rwm".into(),
        }
    }
}

/// A device resolved on the host, ready to be given to the manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDevice {
    /// The OCI request. `None` for devices the runtime adds itself
    /// (virtio-fs shares, a block-backed rootfs).
    pub info: Option<DeviceInfo>,
    /// Host path of the node, file or socket directory backing the device.
    pub host_path: PathBuf,
    pub kind: DeviceKind,
}
