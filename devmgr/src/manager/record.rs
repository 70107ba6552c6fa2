//! The manager's per-device record and the rules tying a device's kind to the
//! addresses it holds. Records are persisted as they are (see `state`).
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use capsule_device_api::{AttachRequest, Needs};

use crate::alloc::{virtio_drive_name, Space};
use crate::device::{
    BlockDriver, DevType, DeviceInfo, DeviceKind, GuestAddress, HostDevice, ScsiAddr,
};
use crate::owner::Owner;

/// A device's id, displayed and persisted as `dev<N>`. Ids come from a
/// persisted counter and are never reused within a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u64);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev{}", self.0)
    }
}

impl FromStr for DeviceId {
    type Err = String;
    /// Parses the canonical form only (`dev7`, not `dev07` or `dev+7`).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("device id {s:?}: expected dev<N>");
        let digits = s.strip_prefix("dev").ok_or_else(bad)?;
        let canonical = digits == "0" || (!digits.starts_with('0') && !digits.is_empty());
        if !canonical || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        digits.parse().map(DeviceId).map_err(|_| bad())
    }
}

impl Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Where a device is in its attach life cycle.
///
/// | status           | attach_count | resources | guest_address |
/// |------------------|--------------|-----------|---------------|
/// | `Detached`       | 0            | none      | none          |
/// | `Attaching`      | 0            | reserved  | none          |
/// | `Attached`       | >= 1         | held      | some          |
/// | `Detaching`      | 1            | held      | some          |
/// | `UnplugPending`  | 1            | held      | some          |
///
/// `Attaching` and `Detaching` are persisted before the backend call and are
/// only ever seen by other callers after a crash (the per-device operation
/// lock hides them otherwise): the backend call may or may not have happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceStatus {
    Detached,
    Attaching,
    Attached,
    Detaching,
    /// An unplug was requested (or a rollback unplug failed) and not
    /// confirmed: the guest may still use the device, so it keeps everything.
    UnplugPending,
}

impl fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceStatus::Detached => "detached",
            DeviceStatus::Attaching => "attaching",
            DeviceStatus::Attached => "attached",
            DeviceStatus::Detaching => "detaching",
            DeviceStatus::UnplugPending => "unplug pending",
        })
    }
}

/// Addresses allocated to a device while it is (being) attached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_index: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmem_index: Option<u32>,
    /// One per PCI function, in function order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pci_slots: Vec<u32>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.block_index.is_none() && self.pmem_index.is_none() && self.pci_slots.is_empty()
    }

    /// Every held index with its space.
    pub fn iter(&self) -> impl Iterator<Item = (Space, u32)> + '_ {
        self.block_index
            .map(|i| (Space::Block, i))
            .into_iter()
            .chain(self.pmem_index.map(|i| (Space::Pmem, i)))
            .chain(self.pci_slots.iter().map(|&s| (Space::PciSlot, s)))
    }
}

/// One reference to a device: who holds it and, for a container, what its
/// OCI request was (users of one device may differ in container path, mode
/// and owner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceUse {
    pub owner: Owner,
    /// The container's `linux.devices` entry; `None` for the runtime's uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<DeviceInfo>,
}

impl DeviceUse {
    pub fn new(owner: Owner, request: Option<DeviceInfo>) -> Self {
        Self { owner, request }
    }
}

/// One device of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    pub id: DeviceId,
    /// Host path of the node, file or socket (the first user's).
    pub host_path: PathBuf,
    pub kind: DeviceKind,
    /// Block driver, fixed when the record is created (block devices only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<BlockDriver>,
    /// One entry per reference, oldest first. The reference count is its
    /// length.
    pub uses: Vec<DeviceUse>,
    pub attach_count: u32,
    pub status: DeviceStatus,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_address: Option<GuestAddress>,
}

impl DeviceRecord {
    pub fn ref_count(&self) -> u32 {
        u32::try_from(self.uses.len()).unwrap_or(u32::MAX)
    }

    /// Whether the guest may see the device (its backend objects may exist).
    pub fn is_plugged(&self) -> bool {
        !matches!(self.status, DeviceStatus::Detached)
    }

    /// Whether the device was opened read-only: the first user's setting
    /// (every user agrees; the manager refuses a use that does not).
    pub fn read_only(&self) -> bool {
        self.uses.first().is_some_and(|u| use_read_only(&u.request))
    }

    /// The device as the first user asked for it.
    pub fn host_device(&self) -> HostDevice {
        HostDevice {
            info: self.first_request().cloned(),
            host_path: self.host_path.clone(),
            kind: self.kind.clone(),
        }
    }

    /// The first user's OCI request (`None`: the runtime's device).
    pub fn first_request(&self) -> Option<&DeviceInfo> {
        self.uses.first().and_then(|u| u.request.as_ref())
    }

    /// The uses of `owner`.
    pub fn uses_of<'a>(&'a self, owner: &'a Owner) -> impl Iterator<Item = &'a DeviceUse> + 'a {
        self.uses.iter().filter(move |u| &u.owner == owner)
    }

    /// Predicted virtio-blk name (`vdb`) for devices that show up as one
    /// (virtio-blk, virtio-mmio, vhost-user-blk). SCSI disks get none: the
    /// guest names them `sdX` in probe order and finds them by address.
    pub fn drive_name(&self) -> Option<String> {
        let needs = Needs::of(&self.kind, self.driver);
        self.resources
            .block_index
            .filter(|_| needs.drive_name)
            .map(virtio_drive_name)
    }

    /// SCSI address on the virtio-scsi controller (virtio-scsi disks only).
    pub fn scsi_addr(&self) -> Option<ScsiAddr> {
        let needs = Needs::of(&self.kind, self.driver);
        self.resources
            .block_index
            .filter(|_| needs.scsi)
            .and_then(ScsiAddr::from_index)
    }

    pub fn block_index(&self) -> Option<u32> {
        self.resources.block_index
    }

    pub fn pmem_index(&self) -> Option<u32> {
        self.resources.pmem_index
    }

    pub fn pci_slots(&self) -> &[u32] {
        &self.resources.pci_slots
    }

    /// Container paths of every user.
    pub fn container_paths(&self) -> impl Iterator<Item = &Path> {
        self.uses
            .iter()
            .filter_map(|u| u.request.as_ref())
            .map(|i| i.container_path.as_path())
    }

    /// `dev3 (block /dev/sda as /dev/xvda)`: how errors name the device.
    pub fn describe(&self) -> String {
        describe(
            Some(self.id),
            &self.kind,
            &self.host_path,
            self.first_request(),
        )
    }

    /// The backend request for the record's current resources.
    pub fn request(&self) -> AttachRequest {
        AttachRequest {
            id: self.id.to_string(),
            kind: self.kind.clone(),
            host_path: self.host_path.clone(),
            read_only: self.read_only(),
            driver: self.driver,
            block_index: self.resources.block_index,
            drive_name: self.drive_name(),
            scsi_addr: self.scsi_addr(),
            pmem_index: self.resources.pmem_index,
            pci_slots: self.resources.pci_slots.clone(),
        }
    }

    /// Checks the record's own invariants (see [`DeviceStatus`]).
    pub fn check(&self) -> Result<(), String> {
        let needs = Needs::of(&self.kind, self.driver);
        if self.uses.is_empty() {
            return Err("reference count is 0".into());
        }
        if self.attach_count > self.ref_count() {
            return Err(format!(
                "attach count {} exceeds reference count {}",
                self.attach_count,
                self.ref_count()
            ));
        }
        if matches!(self.kind, DeviceKind::Block) != self.driver.is_some() {
            return Err("block devices and only they carry a driver".into());
        }
        if let DeviceKind::Vfio(group) = &self.kind {
            if group.functions.is_empty() {
                return Err("VFIO group has no functions".into());
            }
        }
        if let Some(u) = self
            .uses
            .iter()
            .find(|u| u.owner.is_container() != u.request.is_some())
        {
            return Err(format!(
                "the use of {} {} an OCI request",
                u.owner,
                if u.request.is_some() {
                    "carries"
                } else {
                    "lacks"
                }
            ));
        }
        if self
            .uses
            .iter()
            .any(|u| use_read_only(&u.request) != self.read_only())
        {
            return Err("users disagree on read-only".into());
        }
        let key = DedupeKey::of(&self.kind, &self.host_path, self.first_request());
        if self
            .uses
            .iter()
            .any(|u| DedupeKey::of(&self.kind, &self.host_path, u.request.as_ref()) != key)
        {
            return Err("users name different devices".into());
        }
        use DeviceStatus::*;
        let count_ok = match self.status {
            Detached | Attaching => self.attach_count == 0,
            Attached => self.attach_count >= 1,
            Detaching | UnplugPending => self.attach_count == 1,
        };
        if !count_ok {
            return Err(format!(
                "attach count {} is impossible while {}",
                self.attach_count, self.status
            ));
        }
        if matches!(self.status, Attached | Detaching | UnplugPending)
            != self.guest_address.is_some()
        {
            return Err(format!(
                "guest address does not match status {}",
                self.status
            ));
        }
        if needs.generic && matches!(self.status, Attaching | Detaching | UnplugPending) {
            return Err(format!("generic devices are never {}", self.status));
        }
        let expected = if matches!(self.status, Detached) {
            Needs::NONE
        } else {
            needs
        };
        let r = &self.resources;
        if r.block_index.is_some() != expected.block
            || r.pmem_index.is_some() != expected.pmem
            || r.pci_slots.len() != expected.pci_slots
        {
            let yes = |b: bool| if b { "one" } else { "none" };
            return Err(format!(
                "a {} device that is {} holds {} but needs block index: {}, pmem index: {}, PCI slots: {}",
                self.kind.name(),
                self.status,
                describe_resources(r),
                yes(expected.block),
                yes(expected.pmem),
                expected.pci_slots
            ));
        }
        if needs.scsi && self.scsi_addr().is_none() && r.block_index.is_some() {
            return Err("block index has no SCSI address".into());
        }
        self.check_names()
    }

    /// What translation and resolution guarantee of names and paths, so a
    /// damaged file is refused instead of reaching QEMU or the agent:
    /// absolute normal paths, well-formed VFIO names, canonical access.
    fn check_names(&self) -> Result<(), String> {
        absolute("host path", &self.host_path)?;
        match &self.kind {
            DeviceKind::VhostUser { socket, .. } => absolute("socket", socket)?,
            DeviceKind::Vfio(g) => check_vfio_names(g)?,
            DeviceKind::Network(ep) => {
                absolute("network namespace", &ep.netns)?;
                ep.check()?;
            }
            _ => {}
        }
        for info in self.uses.iter().filter_map(|u| u.request.as_ref()) {
            absolute("container path", &info.container_path)?;
            let canonical: String = "rwm"
                .chars()
                .filter(|c| info.cgroup_access.contains(*c))
                .collect();
            if canonical != info.cgroup_access {
                return Err(format!(
                    "cgroup access {:?} of {} is not a canonical subset of \"rwm\"",
                    info.cgroup_access,
                    info.container_path.display()
                ));
            }
        }
        Ok(())
    }
}

fn absolute(what: &str, p: &Path) -> Result<(), String> {
    use std::path::Component;
    let normal = p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if normal {
        Ok(())
    } else {
        Err(format!(
            "{what} {} is not an absolute normalised path",
            p.display()
        ))
    }
}

fn check_vfio_names(g: &crate::device::VfioGroup) -> Result<(), String> {
    use crate::device::{VfioFunction, VfioMode};
    let ok = match g.mode {
        VfioMode::Legacy => crate::vfio::is_group_name(&g.group),
        VfioMode::Iommufd => crate::vfio::is_cdev_name(&g.group),
    };
    if !ok {
        return Err(format!(
            "VFIO group name {:?} is not valid for {:?} mode",
            g.group, g.mode
        ));
    }
    for f in &g.functions {
        if let VfioFunction::Mediated { uuid, .. } = f {
            if !crate::vfio::is_mdev_uuid(uuid) {
                return Err(format!("mediated device {uuid:?} is not named by a UUID"));
            }
        }
    }
    Ok(())
}

fn describe_resources(r: &Resources) -> String {
    if r.is_empty() {
        return "no addresses".into();
    }
    let mut parts = Vec::new();
    if let Some(i) = r.block_index {
        parts.push(format!("block index {i}"));
    }
    if let Some(i) = r.pmem_index {
        parts.push(format!("pmem index {i}"));
    }
    if !r.pci_slots.is_empty() {
        parts.push(format!("PCI slots {:?}", r.pci_slots));
    }
    parts.join(", ")
}

fn use_read_only(info: &Option<DeviceInfo>) -> bool {
    info.as_ref().is_some_and(|i| i.read_only)
}

pub(crate) fn describe(
    id: Option<DeviceId>,
    kind: &DeviceKind,
    host_path: &Path,
    info: Option<&DeviceInfo>,
) -> String {
    let what = match kind {
        DeviceKind::Network(ep) => format!("network {} in {}", ep.link, ep.netns.display()),
        _ => format!("{} {}", kind.name(), host_path.display()),
    };
    let mut s = match id {
        Some(id) => format!("{id} ({what}"),
        None => format!("({what}"),
    };
    if let Some(info) = info {
        s.push_str(&format!(" as {}", crate::resolve::describe(info)));
    }
    s.push(')');
    s
}

/// What makes two `new_device` calls the same device: the device numbers
/// *with* their type (`c 8:0` is not `b 8:0`), or for devices without
/// numbers (runtime-added, `0:0`) the kind and host path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum DedupeKey {
    Node {
        dev_type: DevType,
        major: u32,
        minor: u32,
    },
    Path {
        kind: &'static str,
        host_path: PathBuf,
    },
    /// A network endpoint: one per link of a network namespace.
    Endpoint { netns: PathBuf, link: String },
}

impl DedupeKey {
    pub fn of(kind: &DeviceKind, host_path: &Path, info: Option<&DeviceInfo>) -> DedupeKey {
        if let DeviceKind::Network(ep) = kind {
            return DedupeKey::Endpoint {
                netns: ep.netns.clone(),
                link: ep.link.clone(),
            };
        }
        match info {
            Some(i) if (i.major, i.minor) != (0, 0) => DedupeKey::Node {
                dev_type: i.dev_type,
                major: i.major,
                minor: i.minor,
            },
            _ => DedupeKey::Path {
                kind: kind.name(),
                host_path: host_path.to_path_buf(),
            },
        }
    }

    pub fn of_record(rec: &DeviceRecord) -> DedupeKey {
        DedupeKey::of(&rec.kind, &rec.host_path, rec.first_request())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_canonical_form_only() {
        assert_eq!("dev0".parse::<DeviceId>(), Ok(DeviceId(0)));
        assert_eq!("dev42".parse::<DeviceId>(), Ok(DeviceId(42)));
        assert_eq!(DeviceId(42).to_string(), "dev42");
        for bad in [
            "",
            "dev",
            "42",
            "dev07",
            "dev+7",
            "dev-1",
            "dev 1",
            "dev99999999999999999999",
            "Dev1",
        ] {
            assert!(bad.parse::<DeviceId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn char_and_block_with_same_numbers_differ() {
        let info = |t| DeviceInfo::new("/dev/x", t, 8, 0);
        let b = DedupeKey::of(
            &DeviceKind::Block,
            Path::new("/dev/sda"),
            Some(&info(DevType::Block)),
        );
        let c = DedupeKey::of(
            &DeviceKind::Generic,
            Path::new("/dev/sda"),
            Some(&info(DevType::Char)),
        );
        assert_ne!(b, c);
        let mut zero = info(DevType::Char);
        zero.major = 0;
        let p1 = DedupeKey::of(&DeviceKind::Generic, Path::new("/a"), Some(&zero));
        let p2 = DedupeKey::of(&DeviceKind::Generic, Path::new("/b"), Some(&zero));
        assert_ne!(p1, p2);
        assert_eq!(
            p1,
            DedupeKey::of(&DeviceKind::Generic, Path::new("/a"), None)
        );
    }
}
