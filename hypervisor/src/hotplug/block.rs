//! virtio-blk-pci and scsi-hd disks on a host file or block device.
use std::os::unix::fs::FileTypeExt;

use serde_json::{json, Value};

use capsule_device_api::ScsiAddr;
use capsule_device_api::{AttachRequest, BackendError, BackendErrorKind};

use super::{failed, pci_placement, AddressPlan, DevicePlan, Step};
use crate::layout::VmLayout;
use crate::naming::Names;

/// The `raw` node over the host file (`file`) or block device
/// (`host_device`). `aio=threads`: io_uring is not available everywhere.
pub(crate) fn blockdev_args(req: &AttachRequest, names: &Names) -> Result<Value, BackendError> {
    let meta = std::fs::metadata(&req.host_path).map_err(|e| {
        failed(format!(
            "device {}: host path {}: {e}",
            req.id,
            req.host_path.display()
        ))
    })?;
    let file_driver = if meta.file_type().is_block_device() {
        "host_device"
    } else if meta.is_file() {
        "file"
    } else {
        return Err(failed(format!(
            "device {}: host path {} is neither a block device nor a regular file",
            req.id,
            req.host_path.display()
        )));
    };
    let filename = req.host_path.to_str().ok_or_else(|| {
        failed(format!(
            "device {}: host path {} is not UTF-8",
            req.id,
            req.host_path.display()
        ))
    })?;
    Ok(json!({
        "driver": "raw",
        "node-name": names.node(),
        "read-only": req.read_only,
        "file": {
            "driver": file_driver,
            "filename": filename,
            "aio": "threads",
        },
    }))
}

pub fn plan_virtio_blk(
    req: &AttachRequest,
    names: &Names,
    layout: &VmLayout,
    slots: &[u32],
) -> Result<DevicePlan, BackendError> {
    let placement = pci_placement(&req.id, layout, slots, 0)?;
    let mut dev = json!({
        "driver": "virtio-blk-pci",
        "id": names.device(),
        "drive": names.node(),
        "serial": req.id,
    });
    placement.apply(&mut dev);
    Ok(DevicePlan {
        id: req.id.clone(),
        kind: "virtio-blk",
        steps: vec![
            Step::Blockdev {
                node: names.node(),
                args: blockdev_args(req, names)?,
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
        vhost_socket: None,
        unplug_unsupported: None,
    })
}

pub fn plan_scsi_hd(
    req: &AttachRequest,
    names: &Names,
    layout: &VmLayout,
) -> Result<DevicePlan, BackendError> {
    if !layout.scsi_controller {
        return Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!(
                "device {}: the VM has no virtio-scsi controller (block_driver is not virtio-scsi)",
                req.id
            ),
        ));
    }
    let addr = req
        .scsi_addr
        .or_else(|| req.block_index.and_then(ScsiAddr::from_index))
        .ok_or_else(|| {
            failed(format!(
                "device {}: scsi-hd needs a SCSI address or block index",
                req.id
            ))
        })?;
    let dev = json!({
        "driver": "scsi-hd",
        "id": names.device(),
        "bus": "scsi0.0",
        "drive": names.node(),
        "channel": 0,
        "scsi-id": addr.id,
        "lun": addr.lun,
        "serial": req.id,
    });
    Ok(DevicePlan {
        id: req.id.clone(),
        kind: "scsi-hd",
        steps: vec![
            Step::Blockdev {
                node: names.node(),
                args: blockdev_args(req, names)?,
            },
            Step::Device {
                id: names.device(),
                args: dev,
            },
        ],
        address: AddressPlan::Scsi(addr),
        vhost_socket: None,
        unplug_unsupported: None,
    })
}
