//! What attaching a device takes from the machine, derived from its kind
//! and block driver. The device manager allocates exactly this before it
//! asks a backend; the backend checks the request carries it. This is the
//! one place the rule "virtio-blk needs a PCI slot, virtio-scsi needs none"
//! is written.
use crate::kind::{BlockDriver, DeviceKind, VhostUserKind};

/// The addresses and constraints of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// A block index (drive name, SCSI address).
    pub block: bool,
    /// The guest names it like a virtio disk (`vdb`), predicted from the
    /// block index (informational only: the guest finds it by address).
    pub drive_name: bool,
    /// It sits on the sandbox's virtio-scsi controller (SCSI address from
    /// the block index).
    pub scsi: bool,
    /// An nvdimm index (`/dev/pmemN`).
    pub pmem: bool,
    /// PCI slots, one per PCI function.
    pub pci_slots: usize,
    /// Counted only, never sent to the backend (char devices, fifos).
    pub generic: bool,
}

impl Needs {
    /// Nothing at all (what a detached device holds).
    pub const NONE: Needs = Needs {
        block: false,
        drive_name: false,
        scsi: false,
        pmem: false,
        pci_slots: 0,
        generic: false,
    };

    /// What a device of `kind` (block devices: with `driver`) needs.
    pub fn of(kind: &DeviceKind, driver: Option<BlockDriver>) -> Needs {
        let none = Needs::NONE;
        match kind {
            DeviceKind::Generic => Needs {
                generic: true,
                ..none
            },
            DeviceKind::Pmem => Needs { pmem: true, ..none },
            DeviceKind::Block => match driver.unwrap_or_default() {
                BlockDriver::VirtioScsi => Needs {
                    block: true,
                    scsi: true,
                    ..none
                },
                BlockDriver::VirtioBlk => Needs {
                    block: true,
                    drive_name: true,
                    pci_slots: 1,
                    ..none
                },
                BlockDriver::Nvdimm => Needs { pmem: true, ..none },
            },
            DeviceKind::VhostUser {
                vhost: VhostUserKind::Blk,
                ..
            } => Needs {
                block: true,
                drive_name: true,
                pci_slots: 1,
                ..none
            },
            DeviceKind::VhostUser {
                vhost: VhostUserKind::Scsi,
                ..
            } => Needs {
                block: true,
                pci_slots: 1,
                ..none
            },
            DeviceKind::VhostUser { .. } => Needs {
                pci_slots: 1,
                ..none
            },
            DeviceKind::Network(_) => Needs {
                pci_slots: 1,
                ..none
            },
            // One slot per function, mediated devices included.
            DeviceKind::Vfio(group) => Needs {
                pci_slots: group.functions.len(),
                ..none
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_by_kind() {
        let of = |d| Needs::of(&DeviceKind::Block, Some(d));
        assert!(!of(BlockDriver::Nvdimm).block && of(BlockDriver::Nvdimm).pmem);
        assert_eq!(of(BlockDriver::VirtioBlk).pci_slots, 1);
        assert_eq!(of(BlockDriver::VirtioScsi).pci_slots, 0);
        assert!(of(BlockDriver::VirtioScsi).scsi);
        assert!(Needs::of(&DeviceKind::Generic, None).generic);
        assert_eq!(Needs::of(&DeviceKind::Pmem, None).pci_slots, 0);
    }
}
