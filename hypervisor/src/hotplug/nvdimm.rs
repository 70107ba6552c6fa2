//! nvdimm (pmem): a memory-backend-file over the host file plus an nvdimm.
use std::io::{Seek, SeekFrom};

use serde_json::json;

use capsule_device_api::{AttachRequest, BackendError, BackendErrorKind};

use super::{failed, AddressPlan, DevicePlan, Step};
use crate::layout::VmLayout;
use crate::naming::Names;

/// nvdimm sizes are rounded down to this (x86 DIMM alignment).
pub const NVDIMM_ALIGN: u64 = 2 << 20;

pub const UNPLUG_UNSUPPORTED: &str = "QEMU cannot hot-unplug nvdimm devices (\"nvdimm device hot unplug is not supported yet\"); it stays until the VM stops";

/// Size of the host file or block device, rounded down to [`NVDIMM_ALIGN`].
pub fn backing_size(req: &AttachRequest) -> Result<u64, BackendError> {
    let mut f = std::fs::File::open(&req.host_path).map_err(|e| {
        failed(format!(
            "device {}: pmem backing {}: {e}",
            req.id,
            req.host_path.display()
        ))
    })?;
    // Seeking to the end works for files and block devices alike.
    let len = f.seek(SeekFrom::End(0)).map_err(|e| {
        failed(format!(
            "device {}: size of {}: {e}",
            req.id,
            req.host_path.display()
        ))
    })?;
    let aligned = len / NVDIMM_ALIGN * NVDIMM_ALIGN;
    if aligned == 0 {
        return Err(failed(format!(
            "device {}: pmem backing {} is {len} bytes, smaller than the {NVDIMM_ALIGN}-byte nvdimm alignment",
            req.id,
            req.host_path.display()
        )));
    }
    Ok(aligned)
}

pub fn plan(
    req: &AttachRequest,
    names: &Names,
    layout: &VmLayout,
) -> Result<DevicePlan, BackendError> {
    if !layout.nvdimm {
        return Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!(
                "device {}: the VM was started without nvdimm support (no pmem config)",
                req.id
            ),
        ));
    }
    let path = req.host_path.to_str().ok_or_else(|| {
        failed(format!(
            "device {}: host path {} is not UTF-8",
            req.id,
            req.host_path.display()
        ))
    })?;
    let size = backing_size(req)?;
    let mut obj = json!({
        "qom-type": "memory-backend-file",
        "id": names.object(),
        "mem-path": path,
        "size": size,
        "share": true,
    });
    let mut dev = json!({ "driver": "nvdimm", "id": names.device(), "memdev": names.object() });
    if req.read_only {
        obj["readonly"] = json!(true);
        dev["unarmed"] = json!(true);
    }
    Ok(DevicePlan {
        id: req.id.clone(),
        kind: "nvdimm",
        steps: vec![
            Step::Object {
                id: names.object(),
                args: obj,
            },
            Step::Device {
                id: names.device(),
                args: dev,
            },
        ],
        address: AddressPlan::Pmem {
            device: names.device(),
            index: req.pmem_index,
        },
        vhost_socket: None,
        unplug_unsupported: Some(UNPLUG_UNSUPPORTED),
    })
}
