//! Arbitrary bytes as what QEMU sends on the QMP socket: split into lines the
//! way the client's reader does, each decoded by `qmp::parse_message`, and
//! every reply run through the typed decoders the client uses (query-status,
//! query-pci with the PCI-path walker, qom-list, query-chardev,
//! query-named-block-nodes) and every event through its accessors. Nothing
//! may panic; a decoded event re-parses to itself.
#![no_main]

use capsule_devmgr::device::PciPath;
use capsule_hypervisor::pci_path::{all_pci_paths, find_pci_path};
use capsule_hypervisor::qmp::{
    parse_message, BlockNodeInfo, ChardevInfo, ObjectPropertyInfo, PciBusInfo, QmpError,
    QmpMessage, StatusInfo,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn typed_replies(ret: &Value) {
    let _ = serde_json::from_value::<StatusInfo>(ret.clone());
    if let Ok(buses) = serde_json::from_value::<Vec<PciBusInfo>>(ret.clone()) {
        for (id, path) in all_pci_paths(&buses) {
            assert!(!id.is_empty());
            assert_eq!(find_pci_path(&buses, &id).as_ref(), Some(&path), "{id}");
            assert_eq!(path.to_string().parse::<PciPath>().unwrap(), path);
        }
    }
    if let Ok(props) = serde_json::from_value::<Vec<ObjectPropertyInfo>>(ret.clone()) {
        for p in &props {
            if let Some(t) = p.child_type() {
                assert_eq!(p.type_, format!("child<{t}>"));
            }
        }
    }
    let _ = serde_json::from_value::<Vec<ChardevInfo>>(ret.clone());
    let _ = serde_json::from_value::<Vec<BlockNodeInfo>>(ret.clone());
}

fuzz_target!(|data: &[u8]| {
    for raw in data.split(|&b| b == b'\n') {
        let mut line = raw;
        while let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(msg) = parse_message(line) else {
            continue;
        };
        match &msg {
            QmpMessage::Reply {
                result: Ok(ret), ..
            } => typed_replies(ret),
            QmpMessage::Reply {
                result: Err((class, desc)),
                ..
            } => {
                let e = QmpError::Command {
                    command: "fuzz".into(),
                    class: class.clone(),
                    desc: desc.clone(),
                };
                assert_eq!(e.class(), Some(class.as_str()));
                let _ = e.to_string();
            }
            QmpMessage::Event(ev) => {
                let _ = ev.deleted_device();
                let back = serde_json::to_vec(ev).unwrap();
                // (`data` may hold floats, which serde_json does not
                // round-trip exactly without `float_roundtrip`.)
                match parse_message(&back).unwrap() {
                    QmpMessage::Event(again) => {
                        assert_eq!(again.event, ev.event);
                        assert_eq!(again.timestamp, ev.timestamp);
                    }
                    other => panic!("event re-parsed as {other:?}"),
                }
            }
            QmpMessage::Ignored(_) => {}
        }
    }
});
