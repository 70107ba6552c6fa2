//! Rewrites the spec's device numbers from the host's to the guest's.
//!
//! All rules are rewritten in one pass against the *original* host numbers,
//! so a swap (host 8:0 -> guest 8:16 while host 8:16 -> guest 8:0) is not
//! rewritten twice.
use std::collections::HashMap;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, Spec};

use super::nodes::{normalize, NodeType};
use super::{describe, DeviceError, PreparedDevice};

/// The cgroup rule type of a node type (FIFOs have no rule).
fn node_class(t: NodeType) -> Option<char> {
    match t {
        NodeType::Block => Some('b'),
        NodeType::Char => Some('c'),
        NodeType::Fifo => None,
    }
}

/// The class of a rule's type (`a` rules are wildcards, never rewritten).
fn rule_class(t: LinuxDeviceType) -> Option<char> {
    match t {
        LinuxDeviceType::B => Some('b'),
        LinuxDeviceType::C | LinuxDeviceType::U => Some('c'),
        LinuxDeviceType::A | LinuxDeviceType::P => None,
    }
}

/// The access a rule gets: the request's (or the rule's own when the request
/// has none), without `w` for a read-only device.
fn access(p: &PreparedDevice, current: Option<&str>) -> String {
    let base = if p.device.cgroup_access.is_empty() {
        current.unwrap_or("rwm")
    } else {
        &p.device.cgroup_access
    };
    base.chars()
        .filter(|c| !(p.device.read_only && *c == 'w'))
        .collect()
}

type Key = (char, i64, i64);

/// See [`super::rewrite_spec`].
pub fn rewrite_spec(spec: &mut Spec, prepared: &[PreparedDevice]) -> Result<(), DeviceError> {
    // (type, host major, host minor) -> device; two devices with the same
    // host numbers must agree on the guest numbers, or the rules are ambiguous.
    let mut by_host: HashMap<Key, &PreparedDevice> = HashMap::new();
    for p in prepared {
        let Some(t) = NodeType::parse(&p.device.dev_type).and_then(node_class) else {
            continue;
        };
        let key = (t, p.device.host_major, p.device.host_minor);
        if let Some(prev) = by_host.insert(key, p) {
            if (prev.guest_major, prev.guest_minor) != (p.guest_major, p.guest_minor) {
                return Err(DeviceError::Invalid {
                    device: describe(&p.device),
                    reason: format!(
                        "host device {} {}:{} is also {}, which became {}:{} in the guest, not {}:{}",
                        t,
                        key.1,
                        key.2,
                        describe(&prev.device),
                        prev.guest_major,
                        prev.guest_minor,
                        p.guest_major,
                        p.guest_minor
                    ),
                });
            }
        }
    }
    let Some(linux) = spec.linux_mut() else {
        return Ok(());
    };

    if let Some(devices) = linux.devices_mut() {
        for entry in devices.iter_mut() {
            let path = entry.path().to_string_lossy().into_owned();
            let Ok(path) = normalize(&path) else { continue };
            let hit = prepared
                .iter()
                .find(|p| normalize(&p.device.container_path).is_ok_and(|c| c == path));
            if let Some(p) = hit {
                if NodeType::parse(&p.device.dev_type) != Some(NodeType::Fifo) {
                    entry.set_major(p.guest_major.into());
                    entry.set_minor(p.guest_minor.into());
                }
            }
        }
    }

    let mut resources = linux.resources().clone().unwrap_or_default();
    let mut rules = resources.devices().clone().unwrap_or_default();
    let mut allowed: Vec<Key> = Vec::new();
    for rule in rules.iter_mut() {
        let (Some(t), Some(maj), Some(min)) =
            (rule.typ().and_then(rule_class), rule.major(), rule.minor())
        else {
            continue;
        };
        let Some(p) = by_host.get(&(t, maj, min)) else {
            continue;
        };
        rule.set_major(Some(p.guest_major.into()));
        rule.set_minor(Some(p.guest_minor.into()));
        if rule.allow() {
            rule.set_access(Some(access(p, rule.access().as_deref())));
            allowed.push((t, maj, min));
        }
    }
    // A device the request grants access to but no rule mentions: allow it
    // (appended, so it wins over an earlier deny-all).
    let mut missing: Vec<(&Key, &&PreparedDevice)> = by_host
        .iter()
        .filter(|(k, p)| !allowed.contains(k) && !p.device.cgroup_access.is_empty())
        .collect();
    missing.sort_by_key(|(k, _)| **k);
    for ((t, _, _), p) in missing {
        let mut rule = LinuxDeviceCgroup::default();
        rule.set_allow(true);
        rule.set_typ(Some(if *t == 'b' {
            LinuxDeviceType::B
        } else {
            LinuxDeviceType::C
        }));
        rule.set_major(Some(p.guest_major.into()));
        rule.set_minor(Some(p.guest_minor.into()));
        rule.set_access(Some(access(p, None)));
        rules.push(rule);
    }
    if !rules.is_empty() {
        resources.set_devices(Some(rules));
        linux.set_resources(Some(resources));
    }
    Ok(())
}
