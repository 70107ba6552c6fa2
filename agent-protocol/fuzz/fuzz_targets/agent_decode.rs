//! Arbitrary bytes as what the agent decodes from the host.
//!
//! The first byte picks the input: one of the request messages (and the
//! `Device` / `Storage` messages nested in them, which the agent also
//! decodes on their own) as protobuf, or the OCI JSON carried in their
//! `bytes` fields on its own (spec, process, resources), so the JSON
//! parsers see structured input too. A message that decodes must re-encode
//! to bytes that decode to the same message, and then goes through the
//! agent's pure request checks: ids, storages, rootfs, the OCI spec
//! (namespaces, mount plan, process, capabilities, rlimits), device
//! addresses and the rewrite of cgroup device rules to guest numbers.
//! Nothing may panic.
#![no_main]

use std::path::PathBuf;

use capsule_agent::container::spec::{
    cap_sets, check_process, clone_flags, mount_plan, parse_process, parse_spec, resolve_rootfs,
    rlimits,
};
use capsule_agent::device::{rewrite_spec, NodeType, PreparedDevice};
use capsule_agent::paths::{is_clean_absolute, valid_id};
use capsule_agent::storage::classify;
use capsule_agent_protocol::agent::*;
use capsule_agent_protocol::protobuf::Message;
use capsule_agent_protocol::wire::{PciPath, ScsiAddr};
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{LinuxResources, Process, Spec};

/// Decodes `M`; a decoded message round-trips through its encoding.
fn decode<M: Message + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::parse_from_bytes(bytes).ok()?;
    let again = m.write_to_bytes().expect("a decoded message encodes");
    assert_eq!(M::parse_from_bytes(&again).expect("re-decodes"), m);
    Some(m)
}

fn pci(s: &str) -> Option<PciPath> {
    let p = s.trim().parse::<PciPath>().ok()?;
    assert_eq!(p.to_string().parse::<PciPath>().unwrap(), p);
    Some(p)
}

/// The address checks the agent makes per device kind.
fn device(d: &Device) {
    let _ = valid_id(&d.id);
    let _ = NodeType::parse(&d.dev_type);
    let _ = is_clean_absolute(std::path::Path::new(&d.container_path));
    let addr = d.guest_address.trim();
    match d.kind.enum_value() {
        Ok(DeviceKind::DEVICE_KIND_BLK_PCI | DeviceKind::DEVICE_KIND_VHOST_USER_BLK) => {
            let _ = pci(addr);
        }
        Ok(DeviceKind::DEVICE_KIND_SCSI) => {
            if let Ok(a) = addr.parse::<ScsiAddr>() {
                assert_eq!(ScsiAddr::from_index(a.to_index()), Some(a));
            }
        }
        Ok(DeviceKind::DEVICE_KIND_VFIO) => {
            for p in addr.split(',') {
                let _ = pci(p);
            }
        }
        _ => {}
    }
}

/// Guest numbers for the rewrite, made up from the request.
fn prepared(devices: &[Device]) -> Vec<PreparedDevice> {
    devices
        .iter()
        .enumerate()
        .map(|(i, d)| PreparedDevice {
            device: d.clone(),
            guest_major: (d.host_minor as u32) % 4096,
            guest_minor: (d.host_major as u32) % (1 << 20),
            guest_node: PathBuf::from(format!("/dev/g{}", i % 3)),
        })
        .collect()
}

fn process(what: &str, p: &Process) {
    let _ = check_process(what, p);
    let _ = cap_sets(what, p);
    let _ = rlimits(what, p);
}

fn spec(cid: &str, mut s: Spec, devices: &[Device]) {
    let _ = clone_flags(cid, &s);
    if let Some(mounts) = s.mounts() {
        let _ = mount_plan(cid, mounts);
    }
    if let Some(p) = s.process() {
        process(cid, p);
    }
    let _ = rewrite_spec(&mut s, &prepared(devices));
}

fn storages(list: &[Storage]) -> Vec<PathBuf> {
    list.iter()
        .filter_map(|s| classify(s).ok().map(|_| PathBuf::from(&s.mount_point)))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 16 {
        0 => {
            if let Some(r) = decode::<CreateContainerRequest>(bytes) {
                let cid = &r.container_id;
                let _ = valid_id(cid);
                let mounts = storages(&r.storages);
                let _ = resolve_rootfs(cid, &r.rootfs, &mounts);
                r.devices.iter().for_each(device);
                if let Ok(s) = parse_spec(cid, &r.oci_spec) {
                    spec(cid, s, &r.devices);
                }
            }
        }
        1 => {
            if let Some(r) = decode::<ExecProcessRequest>(bytes) {
                let _ = valid_id(&r.container_id);
                let _ = valid_id(&r.exec_id);
                if let Ok(p) = parse_process("exec", &r.process) {
                    process("exec", &p);
                }
            }
        }
        2 => {
            if let Some(r) = decode::<AddDeviceRequest>(bytes) {
                let _ = valid_id(&r.container_id);
                if let Some(d) = r.device.as_ref() {
                    device(d);
                }
            }
        }
        3 => {
            if let Some(d) = decode::<Device>(bytes) {
                device(&d);
            }
        }
        4 => {
            if let Some(r) = decode::<CreateSandboxRequest>(bytes) {
                let _ = valid_id(&r.sandbox_id);
                storages(&r.storages);
            }
        }
        5 => {
            if let Some(s) = decode::<Storage>(bytes) {
                let _ = classify(&s);
            }
        }
        6 => {
            if let Some(r) = decode::<UpdateContainerRequest>(bytes) {
                let _ = serde_json::from_slice::<LinuxResources>(&r.resources);
            }
        }
        7 => {
            let _ = decode::<RemoveDeviceRequest>(bytes);
            let _ = decode::<RemoveContainerRequest>(bytes);
            let _ = decode::<DestroySandboxRequest>(bytes);
        }
        8 => {
            let _ = decode::<SignalProcessRequest>(bytes);
            let _ = decode::<ProcessRequest>(bytes);
            let _ = decode::<ContainerRequest>(bytes);
        }
        9 => {
            let _ = decode::<WriteStreamRequest>(bytes);
            let _ = decode::<ReadStreamRequest>(bytes);
            let _ = decode::<TtyWinResizeRequest>(bytes);
        }
        10 => {
            let _ = decode::<HealthRequest>(bytes);
            let _ = decode::<GuestDetailsRequest>(bytes);
            let _ = decode::<Empty>(bytes);
        }
        // The OCI JSON of the bytes fields, on its own.
        11 | 12 => {
            if let Ok(s) = parse_spec("fuzz", bytes) {
                spec("fuzz", s, &[]);
            }
        }
        13 | 14 => {
            if let Ok(p) = parse_process("exec", bytes) {
                process("exec", &p);
            }
        }
        _ => {
            let _ = serde_json::from_slice::<LinuxResources>(bytes);
        }
    }
});
