//! Request checks: addresses parsed per kind, paths, types, access.
use capsule_agent_protocol::agent::{Device, DeviceKind};
use capsule_agent_protocol::wire::{PciPath, ScsiAddr};

use super::sysfs::Target;
use super::{describe, kind_name, nodes, DeviceError, NodeType};

pub(super) fn invalid(d: &Device, reason: impl Into<String>) -> DeviceError {
    DeviceError::Invalid {
        device: describe(d),
        reason: reason.into(),
    }
}

/// The address of `d` parsed for its kind; `None` for GENERIC (no wait).
pub(super) fn parse_target(d: &Device) -> Result<Option<Target>, DeviceError> {
    let addr = d.guest_address.trim();
    let pci = |s: &str| {
        s.trim()
            .parse::<PciPath>()
            .map_err(|e| invalid(d, e.to_string()))
    };
    Ok(Some(match d.kind.enum_value() {
        Ok(DeviceKind::DEVICE_KIND_BLK_PCI | DeviceKind::DEVICE_KIND_VHOST_USER_BLK) => {
            Target::PciBlock(pci(addr)?)
        }
        Ok(DeviceKind::DEVICE_KIND_SCSI) => Target::Scsi(
            addr.parse::<ScsiAddr>()
                .map_err(|e| invalid(d, e.to_string()))?,
        ),
        Ok(DeviceKind::DEVICE_KIND_PMEM) => {
            let ok =
                !addr.is_empty() && addr.len() <= 9 && addr.bytes().all(|b| b.is_ascii_digit());
            Target::Pmem(
                addr.parse()
                    .ok()
                    .filter(|_| ok)
                    .ok_or_else(|| invalid(d, format!("pmem index {addr:?} is not a number")))?,
            )
        }
        Ok(DeviceKind::DEVICE_KIND_VFIO) => {
            let mut paths = Vec::new();
            for p in addr.split(',').map(pci) {
                let p = p?;
                if !paths.contains(&p) {
                    paths.push(p);
                }
            }
            Target::Vfio(paths)
        }
        Ok(DeviceKind::DEVICE_KIND_BLK_MMIO) => {
            let ok = !addr.is_empty()
                && addr.len() <= 32
                && !addr.starts_with('.')
                && addr
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(invalid(
                    d,
                    format!("drive name {addr:?} is not a block device name"),
                ));
            }
            Target::BlockName(addr.to_owned())
        }
        Ok(DeviceKind::DEVICE_KIND_GENERIC) => return Ok(None),
        Ok(DeviceKind::DEVICE_KIND_UNSPECIFIED) | Err(_) => {
            return Err(invalid(d, "device kind not set or unknown"))
        }
    }))
}

/// Checks one request entry; returns it with `dev_type` filled in.
pub(super) fn validate(d: &Device) -> Result<(Device, Option<Target>), DeviceError> {
    let target = parse_target(d)?;
    nodes::container_components(&d.container_path).map_err(|e| invalid(d, e))?;
    let mut d = d.clone();
    let want = match &target {
        None => None,
        Some(Target::Vfio(_)) => Some("c"),
        Some(_) => Some("b"),
    };
    match (want, d.dev_type.as_str()) {
        (Some(w), "") => d.dev_type = w.to_owned(),
        (Some(w), t) if NodeType::parse(t) == NodeType::parse(w) => {}
        (Some(w), t) => {
            return Err(invalid(
                &d,
                format!(
                    "device type {t:?}, but a {} device is {w:?}",
                    kind_name(&d.kind)
                ),
            ))
        }
        (None, t) if NodeType::parse(t).is_none() => {
            return Err(invalid(
                &d,
                format!("device type {t:?} is not b, c, u or p"),
            ))
        }
        (None, _) => {
            let ok = |n: i64| u32::try_from(n).is_ok();
            if !ok(d.host_major) || !ok(d.host_minor) {
                return Err(invalid(
                    &d,
                    format!("numbers {}:{} out of range", d.host_major, d.host_minor),
                ));
            }
        }
    }
    if !d.cgroup_access.bytes().all(|b| b"rwm".contains(&b)) {
        return Err(invalid(
            &d,
            format!("cgroup access {:?} is not a subset of rwm", d.cgroup_access),
        ));
    }
    Ok((d, target))
}
