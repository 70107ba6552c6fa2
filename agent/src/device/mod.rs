//! In-guest device discovery: finds the device the host plugged at a guest
//! address, makes its node in a container's /dev and rewrites the spec's
//! device numbers from the host's to the guest's.
//!
//! How waiting stays race-free and never returns a stale device:
//! - [`DeviceWatcher::start`] subscribes to kernel uevents before any request
//!   is served. An event carries no information the wait relies on: it only
//!   wakes the waiters, which re-resolve the address against the *current*
//!   sysfs. Nothing maps names to addresses, so a removed device is never
//!   matched later and a re-added one is found under its new name.
//! - A wait resolves once when it starts (covering devices that appeared
//!   before the request), after every uevent, and every
//!   [`WatcherConfig::poll_interval`] (covering events netlink dropped).
//! - A match also needs the guest's own node (`/dev/<name>`, made by
//!   devtmpfs) with the same numbers.
mod cgroup;
mod nodes;
mod request;
pub mod sysfs;
pub mod uevent;
mod watcher;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsule_agent_protocol::agent::{Device, DeviceKind};

pub use nodes::NodeType;
pub use sysfs::{Found, Target};
pub use uevent::{Action, Uevent};
pub use watcher::{DeviceWatcher, WatcherConfig};

use request::{invalid, validate};
use watcher::deadline_after;

/// A device as errors name it: `dev3 (blk-pci at 02/01)` (boxed, so the
/// error stays small).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRef(Box<[String; 3]>);

impl DeviceRef {
    pub fn new(id: impl Into<String>, kind: impl Into<String>, address: impl Into<String>) -> Self {
        Self(Box::new([id.into(), kind.into(), address.into()]))
    }
    /// The manager's device id (`dev7`).
    pub fn id(&self) -> &str {
        &self.0[0]
    }
    /// [`kind_name`] of the kind.
    pub fn kind(&self) -> &str {
        &self.0[1]
    }
    /// The guest address as requested.
    pub fn address(&self) -> &str {
        &self.0[2]
    }
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.address().is_empty() {
            write!(f, "{} ({})", self.id(), self.kind())
        } else {
            write!(f, "{} ({} at {})", self.id(), self.kind(), self.address())
        }
    }
}

/// The name of a kind in errors: `blk-pci`, `scsi`, ...
pub fn kind_name(kind: &capsule_agent_protocol::protobuf::EnumOrUnknown<DeviceKind>) -> String {
    match kind.enum_value() {
        Ok(DeviceKind::DEVICE_KIND_BLK_PCI) => "blk-pci".into(),
        Ok(DeviceKind::DEVICE_KIND_SCSI) => "scsi".into(),
        Ok(DeviceKind::DEVICE_KIND_VHOST_USER_BLK) => "vhost-user-blk".into(),
        Ok(DeviceKind::DEVICE_KIND_PMEM) => "pmem".into(),
        Ok(DeviceKind::DEVICE_KIND_VFIO) => "vfio".into(),
        Ok(DeviceKind::DEVICE_KIND_GENERIC) => "generic".into(),
        Ok(DeviceKind::DEVICE_KIND_BLK_MMIO) => "blk-mmio".into(),
        Ok(DeviceKind::DEVICE_KIND_UNSPECIFIED) => "unspecified kind".into(),
        Err(n) => format!("unknown kind {n}"),
    }
}

pub(crate) fn describe(d: &Device) -> DeviceRef {
    DeviceRef::new(d.id.clone(), kind_name(&d.kind), d.guest_address.clone())
}

pub(crate) fn secs(d: &Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[derive(thiserror::Error, Debug)]
pub enum DeviceError {
    /// The device did not show up; `last` says what the last look found.
    #[error("device {device}: not visible in the guest after {} ({last})", secs(.waited))]
    Timeout {
        device: DeviceRef,
        waited: Duration,
        last: String,
    },
    /// Two devices of one request want the same container path.
    #[error("devices {first} and {second} both want container path {path}")]
    Duplicate {
        path: String,
        first: DeviceRef,
        second: DeviceRef,
    },
    /// Two different devices of one request are the same guest device.
    #[error("devices {first} and {second} are both the guest device {node}")]
    SameNode {
        node: String,
        first: DeviceRef,
        second: DeviceRef,
    },
    /// A request field is wrong (address, path, type, access).
    #[error("device {device}: {reason}")]
    Invalid { device: DeviceRef, reason: String },
    /// The node could not be made in the container.
    #[error("device {device}: container node {path}: {reason}")]
    Node {
        device: DeviceRef,
        path: String,
        reason: String,
    },
    #[error("container root {path}: {reason}")]
    ContainerRoot { path: String, reason: String },
    /// The uevent listener could not start.
    #[error("uevent listener: {0}")]
    Listener(String),
}

impl DeviceError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }
}

/// A device found in the guest, ready for [`create_nodes`] and [`rewrite_spec`].
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedDevice {
    /// The request, with `dev_type` filled in from the kind when it was empty.
    pub device: Device,
    pub guest_major: u32,
    pub guest_minor: u32,
    /// The guest's node (`/dev/vdb`); for GENERIC the container path.
    pub guest_node: PathBuf,
}

/// What a wait found: the guest's node and its numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDevice {
    pub node: PathBuf,
    pub major: u32,
    pub minor: u32,
    pub block: bool,
}

/// Validates the request (duplicate container paths -> error naming both
/// devices), waits for each device with `timeout` (one deadline for the whole
/// request: the host plugged them all before asking), and returns what is
/// needed to create nodes and rewrite cgroup rules.
pub async fn prepare(
    watcher: &DeviceWatcher,
    devices: &[Device],
    timeout: Duration,
) -> Result<Vec<PreparedDevice>, DeviceError> {
    let mut plans: Vec<(Device, Option<Target>)> = Vec::with_capacity(devices.len());
    let mut paths: HashMap<PathBuf, usize> = HashMap::new();
    for d in devices {
        let (d, target) = validate(d)?;
        let path = nodes::normalize(&d.container_path).map_err(|e| invalid(&d, e))?;
        if let Some(&i) = paths.get(&path) {
            return Err(DeviceError::Duplicate {
                path: path.display().to_string(),
                first: describe(&plans[i].0),
                second: describe(&d),
            });
        }
        paths.insert(path, plans.len());
        plans.push((d, target));
    }

    let deadline = deadline_after(timeout);
    let mut resolved: HashMap<Target, Found> = HashMap::new();
    let mut out: Vec<PreparedDevice> = Vec::with_capacity(plans.len());
    for (d, target) in plans {
        let prepared = match target {
            None => PreparedDevice {
                guest_major: u32::try_from(d.host_major).unwrap_or_default(),
                guest_minor: u32::try_from(d.host_minor).unwrap_or_default(),
                guest_node: PathBuf::from(&d.container_path),
                device: d,
            },
            Some(target) => {
                let found = match resolved.get(&target) {
                    Some(f) => f.clone(),
                    None => {
                        let f = watcher.resolve(&target, deadline).await.map_err(|last| {
                            DeviceError::Timeout {
                                device: describe(&d),
                                waited: timeout,
                                last,
                            }
                        })?;
                        resolved.insert(target, f.clone());
                        f
                    }
                };
                PreparedDevice {
                    guest_major: found.major,
                    guest_minor: found.minor,
                    guest_node: watcher.dev_root().join(&found.name),
                    device: d,
                }
            }
        };
        let same = |a: &Device, b: &Device| {
            a.id == b.id && a.kind == b.kind && a.guest_address == b.guest_address
        };
        let is_generic =
            |p: &PreparedDevice| p.device.kind.enum_value() == Ok(DeviceKind::DEVICE_KIND_GENERIC);
        if !is_generic(&prepared) {
            if let Some(other) = out.iter().find(|o| {
                !is_generic(o)
                    && o.guest_node == prepared.guest_node
                    && !same(&o.device, &prepared.device)
            }) {
                return Err(DeviceError::SameNode {
                    node: prepared.guest_node.display().to_string(),
                    first: describe(&other.device),
                    second: describe(&prepared.device),
                });
            }
        }
        out.push(prepared);
    }
    Ok(out)
}

/// Creates the nodes under `container_root` (the container's rootfs as seen
/// by the agent, its /dev already mounted) at each container path with the
/// guest's major:minor, mode (0 -> 0666), uid and gid. An existing device
/// node there is replaced; anything else there is an error; a parent that is
/// a symlink leading outside the root is refused.
pub fn create_nodes(container_root: &Path, prepared: &[PreparedDevice]) -> Result<(), DeviceError> {
    nodes::create_nodes(container_root, prepared)
}

/// Rewrites `linux.resources.devices` rules and `linux.devices` entries of the
/// spec from host numbers to guest numbers (allow rules get the request's
/// access, without `w` when read-only; a device with access but no rule gets
/// an allow rule appended).
pub fn rewrite_spec(
    spec: &mut oci_spec::runtime::Spec,
    prepared: &[PreparedDevice],
) -> Result<(), DeviceError> {
    cgroup::rewrite_spec(spec, prepared)
}
