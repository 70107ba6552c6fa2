//! The VM's real device list, read from QEMU, for reconciliation after a
//! restart.
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use capsule_device_api::PciPath;

use crate::naming::{capsule_id_of_backend, capsule_id_of_device};
use crate::pci_path::all_pci_paths;
use crate::qmp::{QmpClient, QmpError};

/// One user-created device (`/machine/peripheral`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDevice {
    /// qdev id (`cap-dev7`, `vser0`, `rp0`).
    pub qdev_id: String,
    /// QOM type (`virtio-blk-pci`).
    pub driver: String,
    pub pci_path: Option<PciPath>,
    /// The device manager id, for devices capsule plugged.
    pub capsule_id: Option<String>,
}

/// What QEMU reports, as of one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDevices {
    pub devices: Vec<VmDevice>,
    /// Named block nodes (auto-named `#block…` nodes excluded).
    pub block_nodes: Vec<String>,
    pub chardevs: Vec<String>,
    /// User-created objects (`/objects`).
    pub objects: Vec<String>,
}

/// The names of `items`, sorted (QMP lists come in no stable order).
pub fn sorted_names<T>(items: Vec<T>, name: impl FnMut(T) -> String) -> Vec<String> {
    let mut names: Vec<String> = items.into_iter().map(name).collect();
    names.sort();
    names
}

impl VmDevices {
    /// Reads everything from QEMU.
    pub async fn query(qmp: &QmpClient) -> Result<Self, QmpError> {
        let peripheral = qmp.peripheral_devices().await?;
        let paths = all_pci_paths(&qmp.query_pci().await?);
        let mut devices: Vec<VmDevice> = peripheral
            .into_iter()
            .map(|(qdev_id, driver)| VmDevice {
                pci_path: paths.get(&qdev_id).cloned(),
                capsule_id: capsule_id_of_device(&qdev_id).map(str::to_owned),
                qdev_id,
                driver,
            })
            .collect();
        devices.sort_by(|a, b| a.qdev_id.cmp(&b.qdev_id));
        // Auto-named nodes (`#block123`) are QEMU's, not anybody's device.
        let mut block_nodes = sorted_names(qmp.query_named_block_nodes().await?, |n| n.node_name);
        block_nodes.retain(|n| !n.starts_with('#'));
        let chardevs = sorted_names(qmp.query_chardev().await?, |c| c.label);
        let objects = sorted_names(qmp.user_objects().await?, |(n, _)| n);
        Ok(Self {
            devices,
            block_nodes,
            chardevs,
            objects,
        })
    }

    pub fn device(&self, qdev_id: &str) -> Option<&VmDevice> {
        self.devices.iter().find(|d| d.qdev_id == qdev_id)
    }

    /// Device manager ids with anything (device or backend) in the VM.
    pub fn capsule_ids(&self) -> BTreeSet<String> {
        let mut ids: BTreeSet<String> = self
            .devices
            .iter()
            .filter_map(|d| d.capsule_id.clone())
            .collect();
        for name in self
            .block_nodes
            .iter()
            .chain(&self.chardevs)
            .chain(&self.objects)
        {
            if let Some(id) = capsule_id_of_backend(name) {
                ids.insert(id.to_owned());
            }
        }
        ids
    }

    /// Whether anything of device manager id `id` is in the VM.
    pub fn has_capsule_id(&self, id: &str) -> bool {
        self.capsule_ids().contains(id)
    }
}
