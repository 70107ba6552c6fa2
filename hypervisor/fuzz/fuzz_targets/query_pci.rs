//! Structure-aware: arbitrary `query-pci` trees (buses, devices, bridges
//! nested at any depth, any slot/function numbers and qdev ids) through the
//! PCI-path walker. Never panics; every path found is valid (1..=16 hops,
//! slots <= 31, functions <= 7), round-trips through its text form, and is
//! what `find_pci_path` returns for its id.
#![no_main]

use arbitrary::Arbitrary;
use capsule_devmgr::device::PciPath;
use capsule_hypervisor::pci_path::{all_pci_paths, find_pci_path};
use capsule_hypervisor::qmp::{PciBridgeInfo, PciBusInfo, PciDeviceInfo};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Bus {
    bus: u8,
    devices: Vec<Dev>,
}

#[derive(Debug, Arbitrary)]
struct Dev {
    bus: u32,
    slot: u32,
    function: u32,
    /// Index into a small set of ids, so duplicates happen.
    id: u8,
    bridge: Option<Vec<Dev>>,
}

/// Bridges nest at most this deep (deeper than the walker's 16 hops, well
/// within serde_json's recursion limit of 128 for the JSON check).
const MAX_NESTING: usize = 24;

fn dev(d: &Dev, depth: usize) -> PciDeviceInfo {
    PciDeviceInfo {
        bus: d.bus,
        slot: d.slot % 40,
        function: d.function % 10,
        qdev_id: match d.id % 8 {
            0 => String::new(),
            n => format!("dev{n}"),
        },
        pci_bridge: d
            .bridge
            .as_ref()
            .filter(|_| depth < MAX_NESTING)
            .map(|b| PciBridgeInfo {
                devices: b.iter().map(|d| dev(d, depth + 1)).collect(),
            }),
    }
}

fuzz_target!(|buses: Vec<Bus>| {
    let buses: Vec<PciBusInfo> = buses
        .iter()
        .map(|b| PciBusInfo {
            bus: u32::from(b.bus % 3),
            devices: b.devices.iter().map(|d| dev(d, 0)).collect(),
        })
        .collect();
    let all = all_pci_paths(&buses);
    for (id, path) in &all {
        assert!(!id.is_empty());
        assert!((1..=16).contains(&path.hops().len()));
        assert!(path.hops().iter().all(|h| h.slot <= 31 && h.function <= 7));
        assert_eq!(&path.to_string().parse::<PciPath>().unwrap(), path);
        assert_eq!(find_pci_path(&buses, id).as_ref(), Some(path));
    }
    assert_eq!(find_pci_path(&buses, ""), None);
    // The JSON form QEMU sends decodes to the same tree.
    let json = serde_json::to_vec(&buses).unwrap();
    let back: Vec<PciBusInfo> = serde_json::from_slice(&json).unwrap();
    assert_eq!(back, buses);
});
