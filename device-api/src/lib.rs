//! The seam between capsule's device manager (`capsule-devmgr`) and a
//! hypervisor (`capsule-hypervisor`): what both sides must agree on, and
//! nothing else.
//!
//! - [`kind`]: what a device is ([`DeviceKind`], [`BlockDriver`], VFIO
//!   groups, vhost-user kinds) and where the guest finds it
//!   ([`GuestAddress`]);
//! - [`needs`]: what each kind needs from the machine ([`Needs`]: PCI
//!   slots, block or pmem index, cold-plug only). The device manager
//!   allocates exactly that, and the hypervisor refuses a request that does
//!   not carry it: there is one allocator per address space, owned by the
//!   device manager;
//! - [`backend`]: the [`DeviceBackend`] trait and its request and errors.
#![forbid(unsafe_code)]

pub mod backend;
pub mod kind;
pub mod needs;

pub use backend::{AttachRequest, BackendError, BackendErrorKind, DeviceBackend, UnplugOutcome};
pub use kind::{
    Bdf, BlockDriver, DeviceKind, GuestAddress, NetEndpoint, VfioFunction, VfioGroup, VfioMode,
    VhostUserKind, MAX_NET_MTU, MAX_NET_QUEUES, MIN_NET_MTU,
};
pub use needs::Needs;

pub use capsule_agent_protocol::wire::{PciPath, PciSlot, ScsiAddr};
