//! A record's guest addresses: taken all or nothing when a device is
//! plugged, given back when it is gone from the guest.
use capsule_device_api::Needs;

use super::{DeviceId, DeviceRecord, DeviceStatus, Resources};
use crate::alloc::{AllocError, Allocators, IndexAllocator};

/// Frees everything `rec` holds and marks it detached.
pub(super) fn reset_detached(rec: &mut DeviceRecord, alloc: &mut Allocators) {
    release(alloc, &std::mem::take(&mut rec.resources), rec.id);
    rec.status = DeviceStatus::Detached;
    rec.attach_count = 0;
    rec.guest_address = None;
}

fn release(alloc: &mut Allocators, res: &Resources, id: DeviceId) {
    for_each_address(alloc, res, id, "release", IndexAllocator::free);
}

/// Takes back exactly `res` (undoing a [`release`] whose save failed).
pub(super) fn reclaim(alloc: &mut Allocators, res: &Resources, id: DeviceId) {
    for_each_address(alloc, res, id, "reclaim", IndexAllocator::reserve);
}

/// Applies `op` to every address `res` holds in its allocator. Failures
/// cannot happen while the allocators match the records (checked on load,
/// kept by every operation); they are logged, never acted on twice.
fn for_each_address(
    alloc: &mut Allocators,
    res: &Resources,
    id: DeviceId,
    what: &str,
    op: fn(&mut IndexAllocator, u32) -> Result<(), AllocError>,
) {
    let held = [
        (&mut alloc.block, res.block_index),
        (&mut alloc.pmem, res.pmem_index),
    ];
    for (space, index) in held {
        if let Some(Err(e)) = index.map(|i| op(space, i)) {
            tracing::error!(device = %id, error = %e, "address {what} failed");
        }
    }
    for &slot in &res.pci_slots {
        if let Err(e) = op(&mut alloc.pci, slot) {
            tracing::error!(device = %id, error = %e, "address {what} failed");
        }
    }
}

/// Allocates what `plan` needs, all or nothing.
pub(super) fn allocate(
    alloc: &mut Allocators,
    plan: Needs,
    id: DeviceId,
) -> Result<Resources, AllocError> {
    fn take(alloc: &mut Allocators, plan: Needs, res: &mut Resources) -> Result<(), AllocError> {
        if plan.block {
            res.block_index = Some(alloc.block.alloc()?);
        }
        if plan.pmem {
            res.pmem_index = Some(alloc.pmem.alloc()?);
        }
        res.pci_slots = alloc.pci.alloc_many(plan.pci_slots)?;
        Ok(())
    }
    let mut res = Resources::default();
    match take(alloc, plan, &mut res) {
        Ok(()) => Ok(res),
        Err(e) => {
            release(alloc, &res, id);
            Err(e)
        }
    }
}
