//! vhost-user-blk-pci, vhost-user-scsi-pci and vhost-user-fs-pci.
use std::path::Path;

use serde_json::json;

use capsule_device_api::VhostUserKind;
use capsule_device_api::{AttachRequest, BackendError, BackendErrorKind};

use super::{failed, pci_placement, AddressPlan, DevicePlan, Step};
use crate::layout::VmLayout;
use crate::naming::Names;

/// Longest virtio-fs tag (the config-space field is 36 bytes).
const MAX_FS_TAG: usize = 36;

pub fn plan(
    req: &AttachRequest,
    names: &Names,
    layout: &VmLayout,
    slots: &[u32],
    vhost: VhostUserKind,
    socket: &Path,
    tag: &str,
) -> Result<DevicePlan, BackendError> {
    if !layout.shared_memory {
        return Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!(
                "device {}: vhost-user needs guest memory shared with the backend, and this VM was started without shared memory (share=on)",
                req.id
            ),
        ));
    }
    let (driver, kind) = match vhost {
        VhostUserKind::Blk => ("vhost-user-blk-pci", "vhost-user-blk"),
        VhostUserKind::Scsi => ("vhost-user-scsi-pci", "vhost-user-scsi"),
        VhostUserKind::Fs => ("vhost-user-fs-pci", "vhost-user-fs"),
        VhostUserKind::Net => {
            return Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!("device {}: vhost-user-net is not supported", req.id),
            ))
        }
    };
    let placement = pci_placement(&req.id, layout, slots, 0)?;
    let mut dev = json!({ "driver": driver, "id": names.device(), "chardev": names.chardev() });
    if let Some(obj) = dev.as_object_mut() {
        match vhost {
            VhostUserKind::Blk => {
                obj.insert("num-queues".into(), json!(1));
            }
            VhostUserKind::Scsi => {
                obj.insert("num_queues".into(), json!(1));
            }
            VhostUserKind::Fs => {
                if tag.is_empty() || tag.len() > MAX_FS_TAG {
                    return Err(failed(format!(
                        "device {}: virtio-fs tag {tag:?} must be 1..={MAX_FS_TAG} bytes",
                        req.id
                    )));
                }
                obj.insert("tag".into(), json!(tag));
            }
            VhostUserKind::Net => {}
        }
    }
    placement.apply(&mut dev);
    Ok(DevicePlan {
        id: req.id.clone(),
        kind,
        steps: vec![
            Step::VhostChardev {
                id: names.chardev(),
                socket: socket.to_path_buf(),
            },
            Step::Device {
                id: names.device(),
                args: dev,
            },
        ],
        address: AddressPlan::Pci {
            device: names.device(),
            predicted: placement.predicted,
        },
        vhost_socket: Some(socket.to_path_buf()),
        unplug_unsupported: None,
    })
}
