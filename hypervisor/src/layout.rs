//! Where capsule puts things on the guest's PCI buses. Every device the
//! runtime adds itself has a fixed address, so the path of a cold-plugged
//! device is known before boot and a hotplug target is a pure function of
//! the slot the device manager allocated.
//!
//! - `pc`: slot 1 is the PIIX3; 2 = virtio-serial, 3 = virtio-scsi,
//!   4 = vhost-vsock, 5 = virtio-rng, 31 = virtio-balloon; the device
//!   manager's slots are [`PC_FIRST_DEVICE_SLOT`]..=[`PC_LAST_DEVICE_SLOT`]
//!   on `pci.0`.
//! - `q35`: 2..=5 as above on `pcie.0`, 6 = virtio-balloon; root port `rpN`
//!   sits at slot [`Q35_ROOT_PORT_BASE_SLOT`]` + N` and the device
//!   manager's "slot" N means "behind `rpN`, device 0".
use serde::{Deserialize, Serialize};

use capsule_device_api::{PciPath, PciSlot};

use crate::config::MachineType;

pub const SLOT_VIRTIO_SERIAL: u8 = 2;
pub const SLOT_VIRTIO_SCSI: u8 = 3;
pub const SLOT_VSOCK: u8 = 4;
pub const SLOT_RNG: u8 = 5;
pub const PC_FIRST_DEVICE_SLOT: u32 = 6;
pub const PC_LAST_DEVICE_SLOT: u32 = 30;
/// virtio-balloon (free page reporting) on `pc`.
pub const PC_SLOT_BALLOON: u8 = 31;
/// virtio-balloon on `q35`'s root bus (root ports start at 8).
pub const Q35_SLOT_BALLOON: u8 = 6;
pub const Q35_ROOT_PORT_BASE_SLOT: u8 = 8;
/// Root ports fit in slots 0x08..=0x1e (0x1f is the ICH9 LPC/SATA/SMBus).
pub const MAX_ROOT_PORTS: u32 = 0x1e - Q35_ROOT_PORT_BASE_SLOT as u32 + 1;

/// The persisted facts hotplug planning depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmLayout {
    pub machine: MachineType,
    /// q35 root ports (0 on pc).
    pub root_ports: u32,
    /// Guest RAM is shared (memfd share=on): vhost-user allowed.
    pub shared_memory: bool,
    /// `scsi0` exists.
    pub scsi_controller: bool,
    /// nvdimm=on (pmem devices allowed).
    pub nvdimm: bool,
}

/// Where a PCI device is plugged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciTarget {
    pub bus: String,
    pub addr: String,
    /// The path the guest will see.
    pub path: PciPath,
}

impl VmLayout {
    /// The `bus`/`addr` of device-manager slot `slot`.
    pub fn pci_target(&self, slot: u32) -> Result<PciTarget, String> {
        match self.machine {
            MachineType::Pc => {
                if !(PC_FIRST_DEVICE_SLOT..=PC_LAST_DEVICE_SLOT).contains(&slot) {
                    return Err(format!(
                        "PCI slot {slot} outside the device range {PC_FIRST_DEVICE_SLOT}..={PC_LAST_DEVICE_SLOT} of pci.0"
                    ));
                }
                let hop =
                    PciSlot::new(slot as u8, 0).ok_or_else(|| format!("bad PCI slot {slot}"))?;
                Ok(PciTarget {
                    bus: "pci.0".into(),
                    addr: format!("{slot:#04x}"),
                    path: PciPath::new(vec![hop]).ok_or("empty PCI path")?,
                })
            }
            MachineType::Q35 => {
                if slot >= self.root_ports {
                    return Err(format!(
                        "root port {slot} does not exist (the VM has {})",
                        self.root_ports
                    ));
                }
                Ok(PciTarget {
                    bus: format!("rp{slot}"),
                    addr: "0x0".into(),
                    path: root_port_path(slot)?,
                })
            }
        }
    }

    /// The slot numbers the device manager may allocate (its `pci_slots`
    /// range for this VM).
    pub fn device_slot_range(&self) -> std::ops::Range<u32> {
        match self.machine {
            MachineType::Pc => PC_FIRST_DEVICE_SLOT..PC_LAST_DEVICE_SLOT + 1,
            MachineType::Q35 => 0..self.root_ports,
        }
    }

    /// Every slot a device can be given, in order.
    pub fn device_slots(&self) -> Vec<u32> {
        self.device_slot_range().collect()
    }
}

/// The guest path of the device behind root port `n`.
fn root_port_path(n: u32) -> Result<PciPath, String> {
    let port = u8::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(Q35_ROOT_PORT_BASE_SLOT))
        .and_then(|s| PciSlot::new(s, 0))
        .ok_or_else(|| format!("root port {n} out of range"))?;
    let dev = PciSlot::new(0, 0).ok_or("bad slot")?;
    PciPath::new(vec![port, dev]).ok_or_else(|| "empty PCI path".into())
}

/// The root-bus slot of root port `n`.
pub fn root_port_slot(n: u32) -> u8 {
    Q35_ROOT_PORT_BASE_SLOT.saturating_add(u8::try_from(n).unwrap_or(u8::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(machine: MachineType) -> VmLayout {
        VmLayout {
            machine,
            root_ports: 4,
            shared_memory: true,
            scsi_controller: true,
            nvdimm: false,
        }
    }

    #[test]
    fn pc_slots_map_to_root_bus() {
        let t = layout(MachineType::Pc).pci_target(6).unwrap();
        assert_eq!(
            (t.bus.as_str(), t.addr.as_str(), t.path.to_string().as_str()),
            ("pci.0", "0x06", "06")
        );
        assert_eq!(
            layout(MachineType::Pc)
                .pci_target(30)
                .unwrap()
                .path
                .to_string(),
            "1e"
        );
        assert!(layout(MachineType::Pc).pci_target(5).is_err());
        assert_eq!(layout(MachineType::Pc).device_slot_range(), 6..31);
        assert!(
            layout(MachineType::Pc).pci_target(31).is_err(),
            "the balloon's"
        );
    }

    #[test]
    fn q35_slots_are_root_ports() {
        let t = layout(MachineType::Q35).pci_target(3).unwrap();
        assert_eq!(
            (t.bus.as_str(), t.addr.as_str(), t.path.to_string().as_str()),
            ("rp3", "0x0", "0b/00")
        );
        assert!(layout(MachineType::Q35)
            .pci_target(4)
            .unwrap_err()
            .contains("does not exist"));
        assert_eq!(layout(MachineType::Q35).device_slots(), vec![0, 1, 2, 3]);
        assert_eq!(root_port_slot(MAX_ROOT_PORTS - 1), 0x1e);
    }
}
