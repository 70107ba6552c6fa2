//! What a device is, and where the guest finds it. These types are
//! persisted by the device manager and sent to the hypervisor, so every
//! field change is a state-format change.
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{PciPath, ScsiAddr};

/// Which vhost-user device a backend socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VhostUserKind {
    Blk,
    Scsi,
    Fs,
    Net,
}

/// How a block device reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockDriver {
    /// scsi-hd on the sandbox's virtio-scsi controller (the default).
    #[default]
    VirtioScsi,
    /// virtio-blk-pci.
    VirtioBlk,
    /// An nvdimm (pmem) backed by the file or device.
    Nvdimm,
}

impl FromStr for BlockDriver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "virtio-scsi" => Ok(Self::VirtioScsi),
            "virtio-blk" | "virtio-blk-pci" => Ok(Self::VirtioBlk),
            "virtio-mmio" | "virtio-blk-mmio" => Err(format!(
                "block driver {s:?} is not supported: virtio-mmio needs a machine type with a virtio-mmio bus (microvm), and capsule's pc and q35 machines have none; use virtio-blk or virtio-scsi"
            )),
            "nvdimm" => Ok(Self::Nvdimm),
            other => Err(format!(
                "unknown block driver {other:?} (expected virtio-scsi, virtio-blk or nvdimm)"
            )),
        }
    }
}

/// A PCI address on the host: `domain:bus:device.function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for Bdf {
    type Err = String;
    /// Parses `DDDD:BB:DD.F` or `BB:DD.F` (domain 0). Never panics.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("PCI address {s:?}: {why}");
        let hex = |p: &str, max_len: usize, max: u32, what: &str| -> Result<u32, String> {
            if p.is_empty() || p.len() > max_len || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(&format!("{what} must be hex")));
            }
            u32::from_str_radix(p, 16)
                .ok()
                .filter(|v| *v <= max)
                .ok_or_else(|| bad(&format!("{what} out of range")))
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [d, b, df] => (hex(d, 8, u32::MAX, "domain")?, *b, *df),
            [b, df] => (0, *b, *df),
            _ => return Err(bad("expected [domain:]bus:device.function")),
        };
        let (dev, func) = devfn
            .split_once('.')
            .ok_or_else(|| bad("missing .function"))?;
        Ok(Bdf {
            domain,
            bus: hex(bus, 2, 0xff, "bus")? as u8,
            device: hex(dev, 2, 0x1f, "device")? as u8,
            function: hex(func, 1, 7, "function")? as u8,
        })
    }
}

impl Serialize for Bdf {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bdf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One member of an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum VfioFunction {
    Pci {
        bdf: Bdf,
        vendor: u16,
        device: u16,
        class: u32,
        /// Config space larger than 256 bytes.
        is_pcie: bool,
        /// A 64-bit BAR of 4 GiB or more: the guest needs a large MMIO window.
        large_bar: bool,
    },
    Mediated {
        /// mdev UUID.
        uuid: String,
        /// Resolved `/sys/devices/...` path QEMU gets as `sysfsdev`.
        sysfsdev: PathBuf,
    },
}

/// How the group was opened on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VfioMode {
    /// `/dev/vfio/<group>`.
    Legacy,
    /// `/dev/vfio/devices/vfioN` (iommufd cdev).
    Iommufd,
}

/// A VFIO IOMMU group: every function in it is attached together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfioGroup {
    /// Group number (legacy) or cdev name (`vfio3`, iommufd).
    pub group: String,
    pub mode: VfioMode,
    pub functions: Vec<VfioFunction>,
}

/// A pod network endpoint: a tap beside one of the pod's links (a veth,
/// say) in the pod's network namespace, traffic redirected both ways by tc
/// filters. The guest gets a virtio-net device with the link's MAC and
/// MTU, fed by the tap's queues. Everything needed to undo the plumbing
/// after a crash is here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetEndpoint {
    /// The pod's network namespace.
    pub netns: PathBuf,
    /// Its identity (nsfs device, inode) when plumbed: cleanup never
    /// touches another namespace that now has the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_id: Option<(u64, u64)>,
    /// The pod's link the tap mirrors, and its index.
    pub link: String,
    pub link_index: u32,
    /// The tap capsule made beside it.
    pub tap: String,
    /// The link's MAC (`aa:bb:cc:dd:ee:ff`): the guest device's MAC.
    pub mac: String,
    pub mtu: u32,
    /// Tap queues (virtio-net queue pairs).
    pub queues: u32,
    /// capsule added the link's ingress qdisc (and removes it).
    pub link_qdisc_created: bool,
}

/// Largest MTU a tap (and so virtio-net here) carries: 65535 minus the
/// Ethernet header.
pub const MAX_NET_MTU: u32 = 65521;
/// Smallest MTU (IPv4's minimum).
pub const MIN_NET_MTU: u32 = 68;
/// Most tap queues.
pub const MAX_NET_QUEUES: u32 = 256;

impl NetEndpoint {
    /// Checks what QEMU and the kernel will be given: interface names,
    /// MAC, MTU and queues.
    pub fn check(&self) -> Result<(), String> {
        for (what, name) in [("link", &self.link), ("tap", &self.tap)] {
            let ok = !name.is_empty()
                && name.len() <= 15
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':' && b != b',');
            if !ok {
                return Err(format!(
                    "{what} name {name:?} is not a valid interface name"
                ));
            }
        }
        let octets: Vec<&str> = self.mac.split(':').collect();
        let mac_ok = octets.len() == 6
            && octets
                .iter()
                .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
        if !mac_ok {
            return Err(format!("MAC {:?} is not aa:bb:cc:dd:ee:ff", self.mac));
        }
        if !(MIN_NET_MTU..=MAX_NET_MTU).contains(&self.mtu) {
            return Err(format!(
                "MTU {} of {} is outside {MIN_NET_MTU}..={MAX_NET_MTU}, what a tap and virtio-net carry",
                self.mtu, self.link
            ));
        }
        if !(1..=MAX_NET_QUEUES).contains(&self.queues) {
            return Err(format!(
                "{} queues is outside 1..={MAX_NET_QUEUES}",
                self.queues
            ));
        }
        Ok(())
    }
}

/// What a device is and what attaching it means.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeviceKind {
    /// A host block device, attached with the configured [`BlockDriver`].
    Block,
    /// A node the guest cannot be given a backend for (char devices, fifos):
    /// recorded and counted, never sent to the hypervisor.
    Generic,
    Vfio(VfioGroup),
    VhostUser {
        vhost: VhostUserKind,
        socket: PathBuf,
        /// virtio-fs tag; empty for the other kinds.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        tag: String,
    },
    /// A file or device exposed as an nvdimm (`/dev/pmemN` in the guest).
    Pmem,
    /// A pod network endpoint (virtio-net on a tap).
    Network(NetEndpoint),
}

impl DeviceKind {
    /// Short name used in errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::Block => "block",
            DeviceKind::Generic => "generic",
            DeviceKind::Vfio(_) => "vfio",
            DeviceKind::VhostUser {
                vhost: VhostUserKind::Blk,
                ..
            } => "vhost-user-blk",
            DeviceKind::VhostUser {
                vhost: VhostUserKind::Scsi,
                ..
            } => "vhost-user-scsi",
            DeviceKind::VhostUser {
                vhost: VhostUserKind::Fs,
                ..
            } => "vhost-user-fs",
            DeviceKind::VhostUser {
                vhost: VhostUserKind::Net,
                ..
            } => "vhost-user-net",
            DeviceKind::Pmem => "pmem",
            DeviceKind::Network(_) => "network",
        }
    }
}

/// Where the guest finds an attached device. Returned by the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    content = "address",
    rename_all = "kebab-case",
    deny_unknown_fields
)]
pub enum GuestAddress {
    /// A PCI device (virtio-blk, vhost-user-*): its path from the root bus.
    Pci(PciPath),
    /// A disk on the virtio-scsi controller.
    Scsi(ScsiAddr),
    /// nvdimm number N: `/dev/pmemN`.
    Pmem(u32),
    /// Every function of a VFIO group, in group order.
    Vfio(Vec<PciPath>),
    /// Nothing was attached (generic devices).
    None,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_parses_without_panicking() {
        assert_eq!(
            "0000:3b:00.1".parse::<Bdf>().unwrap(),
            Bdf {
                domain: 0,
                bus: 0x3b,
                device: 0,
                function: 1
            }
        );
        assert_eq!(
            "3b:1f.7".parse::<Bdf>().unwrap().to_string(),
            "0000:3b:1f.7"
        );
        for bad in [
            "",
            "3b",
            "3b:00",
            "0000:3b:00",
            "zz:00.0",
            "00:20.0",
            "00:00.8",
            "::.",
            "0:0:0:0.0",
            "é:00.0",
        ] {
            let e = bad.parse::<Bdf>().unwrap_err();
            assert!(e.contains("PCI address"), "{bad}: {e}");
        }
    }

    #[test]
    fn block_driver_names() {
        assert_eq!(
            "virtio-scsi".parse::<BlockDriver>().unwrap(),
            BlockDriver::VirtioScsi
        );
        assert!("virtio-foo"
            .parse::<BlockDriver>()
            .unwrap_err()
            .contains("virtio-foo"));
        let e = "virtio-mmio".parse::<BlockDriver>().unwrap_err();
        assert!(e.contains("microvm") && e.contains("virtio-blk"), "{e}");
    }
}
