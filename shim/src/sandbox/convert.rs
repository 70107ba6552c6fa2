//! A container's device, as the device manager attached it → the agent's
//! `Device` message.
use capsule_agent_protocol::agent::{self, DeviceKind as AgentKind};
use capsule_devmgr::device::VhostUserKind;
use capsule_devmgr::{ContainerDevice, DeviceKind, GuestAddress};

use crate::error::{Error, Result};

/// What the agent needs to find the device and create its node.
pub fn agent_device(d: &ContainerDevice) -> Result<agent::Device> {
    let (id, kind, driver, info, addr) =
        (d.id.to_string(), &d.kind, d.driver, &d.request, &d.address);
    let unsupported = |what: &str| {
        Error::invalid(format!(
            "device {} ({} {}:{}): {what}",
            info.container_path.display(),
            info.dev_type,
            info.major,
            info.minor
        ))
    };
    let (k, address) = match (kind, addr) {
        (DeviceKind::Generic, _) => (AgentKind::DEVICE_KIND_GENERIC, String::new()),
        (DeviceKind::Block, GuestAddress::Pci(p)) => (AgentKind::DEVICE_KIND_BLK_PCI, p.to_string()),
        (DeviceKind::Block, GuestAddress::Scsi(a)) => (AgentKind::DEVICE_KIND_SCSI, a.to_string()),
        (DeviceKind::Block | DeviceKind::Pmem, GuestAddress::Pmem(n)) => {
            (AgentKind::DEVICE_KIND_PMEM, n.to_string())
        }
        (
            DeviceKind::VhostUser {
                vhost: VhostUserKind::Blk,
                ..
            },
            GuestAddress::Pci(p),
        ) => (AgentKind::DEVICE_KIND_VHOST_USER_BLK, p.to_string()),
        (DeviceKind::VhostUser { vhost, .. }, _) => {
            return Err(unsupported(&format!(
                "vhost-user-{} devices cannot be given to a container (the guest agent supports vhost-user-blk)",
                match vhost {
                    VhostUserKind::Blk => "blk",
                    VhostUserKind::Scsi => "scsi",
                    VhostUserKind::Fs => "fs",
                    VhostUserKind::Net => "net",
                }
            )))
        }
        (DeviceKind::Vfio(_), GuestAddress::Vfio(paths)) => (
            AgentKind::DEVICE_KIND_VFIO,
            paths
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        (k, a) => {
            return Err(Error::internal(format!(
                "device {id}: a {} device (driver {driver:?}) came back at an unexpected guest address {a:?}",
                k.name()
            )))
        }
    };
    Ok(agent::Device {
        id,
        kind: k.into(),
        guest_address: address,
        container_path: info.container_path.display().to_string(),
        dev_type: info.dev_type.to_string(),
        file_mode: info.file_mode.unwrap_or(0),
        uid: info.uid.unwrap_or(0),
        gid: info.gid.unwrap_or(0),
        read_only: info.read_only,
        cgroup_access: info.cgroup_access.clone(),
        host_major: i64::from(info.major),
        host_minor: i64::from(info.minor),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_devmgr::device::{DevType, ScsiAddr};
    use capsule_devmgr::{BlockDriver, DeviceId, DeviceInfo};

    fn dev(
        id: u64,
        kind: DeviceKind,
        driver: Option<BlockDriver>,
        address: GuestAddress,
    ) -> ContainerDevice {
        ContainerDevice {
            id: DeviceId(id),
            request: DeviceInfo {
                container_path: "/dev/xvda".into(),
                dev_type: DevType::Block,
                major: 7,
                minor: 3,
                file_mode: Some(0o660),
                uid: Some(1),
                gid: None,
                read_only: true,
                cgroup_access: "rm".into(),
            },
            kind,
            driver,
            address,
        }
    }

    #[test]
    fn addresses_become_agent_devices() {
        let d = agent_device(&dev(
            2,
            DeviceKind::Block,
            Some(BlockDriver::VirtioScsi),
            GuestAddress::Scsi(ScsiAddr { id: 0, lun: 2 }),
        ))
        .unwrap();
        assert_eq!(d.kind.enum_value().unwrap(), AgentKind::DEVICE_KIND_SCSI);
        assert_eq!((d.id.as_str(), d.guest_address.as_str()), ("dev2", "0:2"));
        assert_eq!(
            (d.host_major, d.host_minor, d.file_mode, d.uid),
            (7, 3, 0o660, 1)
        );
        assert!(d.read_only);
        assert_eq!(d.dev_type, "b");
        let d = agent_device(&dev(
            3,
            DeviceKind::Block,
            Some(BlockDriver::VirtioBlk),
            GuestAddress::Pci("06".parse().unwrap()),
        ))
        .unwrap();
        assert_eq!(d.kind.enum_value().unwrap(), AgentKind::DEVICE_KIND_BLK_PCI);
        assert_eq!(d.guest_address, "06");
        let e = agent_device(&dev(
            4,
            DeviceKind::VhostUser {
                vhost: VhostUserKind::Scsi,
                socket: "/s".into(),
                tag: String::new(),
            },
            None,
            GuestAddress::Pci("07".parse().unwrap()),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("/dev/xvda (b 7:3)"), "{e}");
    }
}
