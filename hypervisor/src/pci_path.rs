//! Guest PCI paths from `query-pci`: walk the buses from the root, through
//! bridges, to the device with a given qdev id.
use std::collections::BTreeMap;

use capsule_device_api::{PciPath, PciSlot};

use crate::qmp::{PciBusInfo, PciDeviceInfo};

/// The path of the device whose qdev id is `qdev_id`: `"05"` for slot 5 on
/// the root bus, `"03/00"` for device 0 behind the bridge at root slot 3.
pub fn find_pci_path(buses: &[PciBusInfo], qdev_id: &str) -> Option<PciPath> {
    if qdev_id.is_empty() {
        return None;
    }
    let mut found = None;
    walk_all(buses, &mut |id, path| {
        if found.is_none() && id == qdev_id {
            found = Some(path.clone());
        }
    });
    found
}

/// Every device with a qdev id, by id.
pub fn all_pci_paths(buses: &[PciBusInfo]) -> BTreeMap<String, PciPath> {
    let mut out = BTreeMap::new();
    walk_all(buses, &mut |id, path| {
        if !id.is_empty() {
            out.entry(id.to_owned()).or_insert_with(|| path.clone());
        }
    });
    out
}

fn walk_all(buses: &[PciBusInfo], f: &mut dyn FnMut(&str, &PciPath)) {
    // Only bus 0 is the root every guest path starts from; extra root buses
    // (pxb) would need their own prefix, which capsule never creates.
    for bus in buses.iter().filter(|b| b.bus == 0) {
        walk(&bus.devices, &mut Vec::new(), f);
    }
}

fn walk(devices: &[PciDeviceInfo], prefix: &mut Vec<PciSlot>, f: &mut dyn FnMut(&str, &PciPath)) {
    for dev in devices {
        let hop = u8::try_from(dev.slot)
            .ok()
            .zip(u8::try_from(dev.function).ok())
            .and_then(|(s, func)| PciSlot::new(s, func));
        let Some(hop) = hop else {
            tracing::warn!(qdev_id = %dev.qdev_id, slot = dev.slot, function = dev.function, "query-pci: address out of range");
            continue;
        };
        prefix.push(hop);
        if let Some(path) = PciPath::new(prefix.clone()) {
            f(&dev.qdev_id, &path);
            if let Some(bridge) = &dev.pci_bridge {
                walk(&bridge.devices, prefix, f);
            }
        }
        prefix.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from QEMU 7.2, q35, two root ports, a disk behind rp1.
    const Q35: &str = r#"[{"bus": 0, "devices": [
        {"irq_pin": 0, "bus": 0, "qdev_id": "", "slot": 0, "class_info": {"class": 1536, "desc": "Host bridge"}, "id": {"device": 10688, "subsystem-vendor": 6900, "vendor": 32902, "subsystem": 4352}, "function": 0, "regions": []},
        {"irq_pin": 1, "bus": 0, "qdev_id": "vser0", "irq": 11, "slot": 2, "class_info": {"class": 1920}, "id": {"device": 4099, "subsystem-vendor": 6900, "vendor": 6900, "subsystem": 3}, "function": 0, "regions": [{"bar": 0, "size": 64, "address": 49152, "type": "io"}]},
        {"irq_pin": 1, "bus": 0, "pci_bridge": {"bus": {"prefetchable_range": {"limit": 4271898623, "base": 4269801472}, "memory_range": {"limit": 4265607167, "base": 4263510016}, "secondary": 1, "io_range": {"limit": 49151, "base": 49152}, "number": 0, "subordinate": 1}, "devices": []}, "qdev_id": "rp0", "irq": 10, "slot": 8, "class_info": {"class": 1540, "desc": "PCI bridge"}, "id": {"device": 12, "vendor": 6966}, "function": 0, "regions": []},
        {"irq_pin": 1, "bus": 0, "pci_bridge": {"bus": {"secondary": 2, "number": 0, "subordinate": 2}, "devices": [{"irq_pin": 1, "bus": 2, "qdev_id": "cap-x", "irq": 10, "slot": 0, "class_info": {"class": 256, "desc": "SCSI controller"}, "id": {"device": 4162, "subsystem-vendor": 6900, "vendor": 6900, "subsystem": 4352}, "function": 0, "regions": []}]}, "qdev_id": "rp1", "irq": 10, "slot": 9, "class_info": {"class": 1540, "desc": "PCI bridge"}, "id": {"device": 12, "vendor": 6966}, "function": 0, "regions": []},
        {"irq_pin": 0, "bus": 0, "qdev_id": "", "slot": 31, "class_info": {"class": 1537, "desc": "ISA bridge"}, "function": 0, "regions": []},
        {"irq_pin": 1, "bus": 0, "qdev_id": "", "irq": 10, "slot": 31, "class_info": {"class": 262, "desc": "SATA controller"}, "function": 2, "regions": []}
    ]}]"#;

    const PC: &str = include_str!("testdata/query-pci-pc.json");

    fn buses(s: &str) -> Vec<PciBusInfo> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn q35_device_behind_root_port() {
        let b = buses(Q35);
        assert_eq!(find_pci_path(&b, "cap-x").unwrap().to_string(), "09/00");
        assert_eq!(find_pci_path(&b, "rp0").unwrap().to_string(), "08");
        assert_eq!(find_pci_path(&b, "vser0").unwrap().to_string(), "02");
        assert_eq!(find_pci_path(&b, "nope"), None);
        assert_eq!(find_pci_path(&b, ""), None);
    }

    #[test]
    fn pc_root_bus_bridge_and_function() {
        let b = buses(PC);
        assert_eq!(find_pci_path(&b, "cap-a").unwrap().to_string(), "05");
        assert_eq!(find_pci_path(&b, "cap-b").unwrap().to_string(), "06/03.2");
        let all = all_pci_paths(&b);
        assert_eq!(all.len(), 4, "{all:?}");
        assert!(!all.contains_key(""));
    }

    #[test]
    fn hostile_input_does_not_panic() {
        let b = buses(
            r#"[{"bus": 0, "devices": [{"bus": 0, "slot": 99, "function": 0, "qdev_id": "x"},
                          {"bus": 0, "slot": 1, "function": 9, "qdev_id": "y"},
                          {"bus": 0, "slot": 4294967295, "function": 0, "qdev_id": "z"}]}]"#,
        );
        assert_eq!(find_pci_path(&b, "x"), None);
        assert_eq!(find_pci_path(&b, "y"), None);
        assert_eq!(find_pci_path(&b, "z"), None);
        // A bridge chain deeper than a PciPath may hold ends the walk.
        let mut dev = serde_json::json!({"bus": 0, "slot": 1, "function": 0, "qdev_id": "deep"});
        for _ in 0..40 {
            dev = serde_json::json!({"bus": 0, "slot": 1, "function": 0, "qdev_id": "", "pci_bridge": {"devices": [dev]}});
        }
        let b: Vec<PciBusInfo> =
            serde_json::from_value(serde_json::json!([{"bus": 0, "devices": [dev]}])).unwrap();
        assert_eq!(find_pci_path(&b, "deep"), None);
    }
}
