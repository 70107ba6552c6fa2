//! virtio-net-pci on a tap (a pod network endpoint): the tap's queue
//! descriptors become a `tap` netdev, the device gets the pod link's MAC
//! and MTU, and multiqueue when the tap has several queues.
use serde_json::json;

use capsule_device_api::{AttachRequest, BackendError, NetEndpoint};

use super::{failed, pci_placement, AddressPlan, DevicePlan, Step};
use crate::layout::VmLayout;
use crate::naming::Names;

pub fn plan(
    req: &AttachRequest,
    names: &Names,
    layout: &VmLayout,
    slots: &[u32],
    ep: &NetEndpoint,
) -> Result<DevicePlan, BackendError> {
    ep.check()
        .map_err(|e| failed(format!("device {}: network endpoint: {e}", req.id)))?;
    let placement = pci_placement(&req.id, layout, slots, 0)?;
    let mut dev = json!({
        "driver": "virtio-net-pci",
        "id": names.device(),
        "netdev": names.netdev(),
        "mac": ep.mac,
        "host_mtu": ep.mtu,
    });
    if let Some(obj) = dev.as_object_mut() {
        if ep.queues > 1 {
            obj.insert("mq".into(), json!(true));
            // One vector per queue of each pair, plus config and control.
            obj.insert("vectors".into(), json!(2 * ep.queues + 2));
        }
    }
    placement.apply(&mut dev);
    Ok(DevicePlan {
        id: req.id.clone(),
        kind: "network",
        steps: vec![
            Step::TapNetdev {
                id: names.netdev(),
                tap: ep.tap.clone(),
                queues: ep.queues,
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
