//! vfio-pci: every function of an IOMMU group, as one unit.
use serde_json::json;

use capsule_device_api::{AttachRequest, BackendError};
use capsule_device_api::{VfioFunction, VfioGroup};

use super::{failed, pci_placement, AddressPlan, DevicePlan, Step};
use crate::layout::VmLayout;
use crate::naming::Names;

pub fn plan(
    req: &AttachRequest,
    names: &Names,
    layout: &VmLayout,
    slots: &[u32],
    group: &VfioGroup,
) -> Result<DevicePlan, BackendError> {
    if group.functions.is_empty() {
        return Err(failed(format!(
            "device {}: VFIO group {} has no functions",
            req.id, group.group
        )));
    }
    if !slots.is_empty() && slots.len() != group.functions.len() {
        return Err(failed(format!(
            "device {}: VFIO group {} has {} functions but {} PCI slots were allocated",
            req.id,
            group.group,
            group.functions.len(),
            slots.len()
        )));
    }
    let mut steps = Vec::new();
    let mut devices = Vec::new();
    let mut predicted = Vec::new();
    for (i, f) in group.functions.iter().enumerate() {
        let id = names.function(i);
        let mut dev = match f {
            VfioFunction::Pci { bdf, .. } => {
                json!({ "driver": "vfio-pci", "id": id, "host": bdf.to_string() })
            }
            VfioFunction::Mediated { sysfsdev, .. } => {
                let path = sysfsdev.to_str().ok_or_else(|| {
                    failed(format!(
                        "device {}: mdev path {} is not UTF-8",
                        req.id,
                        sysfsdev.display()
                    ))
                })?;
                json!({ "driver": "vfio-pci", "id": id, "sysfsdev": path })
            }
        };
        let placement = pci_placement(&req.id, layout, slots, i)?;
        placement.apply(&mut dev);
        devices.push(id.clone());
        predicted.push(placement.predicted);
        steps.push(Step::Device { id, args: dev });
    }
    Ok(DevicePlan {
        id: req.id.clone(),
        kind: "vfio",
        steps,
        address: AddressPlan::Vfio { devices, predicted },
        vhost_socket: None,
        unplug_unsupported: None,
    })
}
