//! Typed forms of the QMP replies and events capsule reads. Only the fields
//! capsule uses are declared; unknown fields are ignored.
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub timestamp: Option<QmpTimestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmpTimestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl QmpEvent {
    /// For `DEVICE_DELETED`: the qdev id, when the event names one (the
    /// first event of a virtio device only carries `path` ending in
    /// `/virtio-backend`).
    pub fn deleted_device(&self) -> Option<&str> {
        if self.event != "DEVICE_DELETED" {
            return None;
        }
        self.data.get("device").and_then(Value::as_str)
    }
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: String,
}

/// One bus of `query-pci`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciBusInfo {
    pub bus: u32,
    #[serde(default)]
    pub devices: Vec<PciDeviceInfo>,
}

/// One device of `query-pci`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    pub bus: u32,
    pub slot: u32,
    pub function: u32,
    #[serde(default)]
    pub qdev_id: String,
    #[serde(default)]
    pub pci_bridge: Option<PciBridgeInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciBridgeInfo {
    #[serde(default)]
    pub devices: Vec<PciDeviceInfo>,
}

/// One entry of `qom-list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectPropertyInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
}

impl ObjectPropertyInfo {
    /// `child<virtio-blk-pci>` → `virtio-blk-pci`.
    pub fn child_type(&self) -> Option<&str> {
        self.type_
            .strip_prefix("child<")
            .and_then(|t| t.strip_suffix('>'))
    }
}

/// One entry of `query-chardev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChardevInfo {
    pub label: String,
    #[serde(default)]
    pub filename: String,
    #[serde(rename = "frontend-open", default)]
    pub frontend_open: bool,
}

/// One entry of `query-named-block-nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockNodeInfo {
    #[serde(rename = "node-name")]
    pub node_name: String,
    #[serde(default)]
    pub drv: String,
    #[serde(default)]
    pub file: String,
    #[serde(default)]
    pub ro: bool,
}
