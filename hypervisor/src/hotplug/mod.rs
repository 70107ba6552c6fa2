//! Turning an [`AttachRequest`] into QEMU objects.
//!
//! Each kind has a pure planner ([`block`], [`vhost_user`], [`vfio`],
//! [`nvdimm`]) producing a [`DevicePlan`]: the backends and devices to
//! create, in order, with deterministic names. The same plan becomes
//! command-line arguments (cold-plug, [`crate::launch`]), QMP commands with
//! rollback ([`exec`]), and the list of things to remove ([`unplug`]).
use std::path::PathBuf;

use serde_json::Value;

use capsule_device_api::{AttachRequest, BackendError, BackendErrorKind};
use capsule_device_api::{BlockDriver, DeviceKind, PciPath, ScsiAddr};

use crate::layout::VmLayout;
use crate::naming::Names;
use crate::qmp::QmpError;

pub mod block;
pub mod exec;
pub mod net;
pub mod nvdimm;
pub mod unplug;
pub mod vfio;
pub mod vhost_user;

/// One object to create.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `blockdev-add` / `-blockdev`; removed with `blockdev-del`.
    Blockdev { node: String, args: Value },
    /// A client socket chardev on the vetted vhost-user connection;
    /// removed with `chardev-remove`.
    VhostChardev { id: String, socket: PathBuf },
    /// `object-add` / `-object`; removed with `object-del`.
    Object { id: String, args: Value },
    /// `device_add` / `-device`; removed with `device_del` + `DEVICE_DELETED`.
    Device { id: String, args: Value },
    /// A `tap` netdev on the queues handed over for `tap` (see
    /// [`crate::tap_fds`]); removed with `netdev_del`.
    TapNetdev {
        id: String,
        tap: String,
        queues: u32,
    },
}

impl Step {
    pub fn name(&self) -> &str {
        match self {
            Step::Blockdev { node, .. } => node,
            Step::VhostChardev { id, .. }
            | Step::Object { id, .. }
            | Step::Device { id, .. }
            | Step::TapNetdev { id, .. } => id,
        }
    }
}

/// What the guest gets told once the plan ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressPlan {
    /// A PCI device; `predicted` when its slot was given.
    Pci {
        device: String,
        predicted: Option<PciPath>,
    },
    /// A VFIO group, one device per function.
    Vfio {
        devices: Vec<String>,
        predicted: Vec<Option<PciPath>>,
    },
    Scsi(ScsiAddr),
    /// nvdimm; the index when the manager allocated one.
    Pmem {
        device: String,
        index: Option<u32>,
    },
    /// Nothing reaches the hypervisor.
    None,
}

/// Everything one device needs, in creation order.
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePlan {
    pub id: String,
    pub kind: &'static str,
    pub steps: Vec<Step>,
    pub address: AddressPlan,
    /// A vhost-user backend socket to vet before anything is created.
    pub vhost_socket: Option<PathBuf>,
    /// The device cannot be unplugged (nvdimm).
    pub unplug_unsupported: Option<&'static str>,
}

impl DevicePlan {
    /// Device ids, in creation order.
    pub fn device_ids(&self) -> Vec<&str> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Device { id, .. } => Some(id.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// Builds the plan for `req`. `slots` are the PCI slots to use (one per PCI
/// device, or empty to let QEMU choose on pc).
pub fn plan(req: &AttachRequest, layout: &VmLayout) -> Result<DevicePlan, BackendError> {
    let names = Names::new(&req.id).map_err(failed)?;
    // The device manager allocates every PCI slot; a backend never
    // chooses one.
    req.check_slots()?;
    let slots = req.pci_slots.as_slice();
    match &req.kind {
        DeviceKind::Generic => Ok(DevicePlan {
            id: req.id.clone(),
            kind: req.kind.name(),
            steps: vec![],
            address: AddressPlan::None,
            vhost_socket: None,
            unplug_unsupported: None,
        }),
        DeviceKind::Block => match req.driver.unwrap_or_default() {
            BlockDriver::VirtioBlk => block::plan_virtio_blk(req, &names, layout, slots),
            BlockDriver::VirtioScsi => block::plan_scsi_hd(req, &names, layout),
            BlockDriver::Nvdimm => nvdimm::plan(req, &names, layout),
        },
        DeviceKind::Pmem => nvdimm::plan(req, &names, layout),
        DeviceKind::VhostUser { vhost, socket, tag } => {
            vhost_user::plan(req, &names, layout, slots, *vhost, socket, tag)
        }
        DeviceKind::Vfio(group) => vfio::plan(req, &names, layout, slots, group),
        DeviceKind::Network(ep) => net::plan(req, &names, layout, slots, ep),
    }
}

/// What to remove for `req`: the same names as [`plan`], without looking at
/// the host (the backing file may be gone by now).
pub fn removal_plan(req: &AttachRequest, _layout: &VmLayout) -> Result<DevicePlan, BackendError> {
    let names = Names::new(&req.id).map_err(failed)?;
    let mut plan = DevicePlan {
        id: req.id.clone(),
        kind: req.kind.name(),
        steps: vec![],
        address: AddressPlan::None,
        vhost_socket: None,
        unplug_unsupported: None,
    };
    let device = Step::Device {
        id: names.device(),
        args: Value::Null,
    };
    match &req.kind {
        DeviceKind::Generic => {}
        DeviceKind::Pmem => plan.unplug_unsupported = Some(nvdimm::UNPLUG_UNSUPPORTED),
        DeviceKind::Block => match req.driver.unwrap_or_default() {
            BlockDriver::Nvdimm => plan.unplug_unsupported = Some(nvdimm::UNPLUG_UNSUPPORTED),
            BlockDriver::VirtioBlk | BlockDriver::VirtioScsi => {
                plan.steps = vec![
                    Step::Blockdev {
                        node: names.node(),
                        args: Value::Null,
                    },
                    device,
                ];
            }
        },
        DeviceKind::VhostUser { socket, .. } => {
            plan.steps = vec![
                Step::VhostChardev {
                    id: names.chardev(),
                    socket: socket.clone(),
                },
                device,
            ];
        }
        DeviceKind::Network(ep) => {
            plan.steps = vec![
                Step::TapNetdev {
                    id: names.netdev(),
                    tap: ep.tap.clone(),
                    queues: ep.queues,
                },
                device,
            ];
        }
        DeviceKind::Vfio(group) => {
            plan.steps = (0..group.functions.len().max(1))
                .map(|i| Step::Device {
                    id: names.function(i),
                    args: Value::Null,
                })
                .collect();
        }
    }
    Ok(plan)
}

/// Where one PCI device goes: `bus`/`addr` (none: QEMU chooses) and the
/// guest path that gives.
#[derive(Debug, Clone, Default)]
pub(crate) struct Placement {
    target: Option<(String, String)>,
    pub predicted: Option<PciPath>,
}

impl Placement {
    /// Adds `bus` and `addr` to `device_add` arguments.
    pub fn apply(&self, args: &mut Value) {
        if let (Some((bus, addr)), Some(obj)) = (&self.target, args.as_object_mut()) {
            obj.insert("bus".into(), Value::String(bus.clone()));
            obj.insert("addr".into(), Value::String(addr.clone()));
        }
    }
}

/// The placement of slot `i` of `slots`.
pub(crate) fn pci_placement(
    req_id: &str,
    layout: &VmLayout,
    slots: &[u32],
    i: usize,
) -> Result<Placement, BackendError> {
    match slots.get(i) {
        None => Err(failed(format!(
            "device {req_id}: {} PCI slots allocated, need at least {}",
            slots.len(),
            i + 1
        ))),
        Some(&slot) => {
            let t = layout
                .pci_target(slot)
                .map_err(|e| failed(format!("device {req_id}: {e}")))?;
            Ok(Placement {
                target: Some((t.bus, t.addr)),
                predicted: Some(t.path),
            })
        }
    }
}

pub(crate) fn failed(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::Failed, message)
}

/// Maps a QMP failure of `what` on device `id` to a backend error.
pub(crate) fn qmp_error(id: &str, what: &str, e: &QmpError) -> BackendError {
    let kind = match e {
        QmpError::Timeout { .. } => BackendErrorKind::Timeout,
        _ => BackendErrorKind::Failed,
    };
    BackendError::new(kind, format!("device {id}: {what}: {e}"))
}

#[cfg(test)]
mod tests;
