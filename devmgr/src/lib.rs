//! capsule device manager.
//!
//! Turns OCI `linux.devices` entries into typed devices ([`resolve`]), keeps
//! their reference and attach counts, their owners and guest addresses
//! ([`manager`]), and persists every sandbox's devices atomically
//! ([`state`]). It drives a hypervisor only through the
//! [`DeviceBackend`] trait of the seam crate `capsule-device-api`, and it is
//! the one owner of every guest address space (block and pmem indexes, PCI
//! slots).
//!
//! A container's devices go through it in one call each way:
//! [`Resolver::resolve_spec`] (once, at Create) →
//! [`DeviceManager::attach_container`] → … →
//! [`DeviceManager::detach_container`].
#![forbid(unsafe_code)]

pub mod alloc;
pub mod device;
pub mod in_use;
pub mod manager;
pub mod oci;
pub mod owner;
pub mod resolve;
pub mod state;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod uevent;
pub mod vfio;
pub mod vhost_store;

pub use capsule_device_api::{
    AttachRequest, BackendError, BackendErrorKind, DeviceBackend, Needs, UnplugOutcome,
};
pub use device::{BlockDriver, DeviceInfo, DeviceKind, GuestAddress, HostDevice, NetEndpoint};
pub use manager::{
    Checkpoint, CheckpointHook, ContainerDevice, DetachOutcome, DeviceId, DeviceManager,
    DeviceRecord, DeviceStatus, DeviceUse, ManagerConfig, ManagerError,
};
pub use owner::Owner;
pub use resolve::{ResolveError, ResolvedDevices, Resolver, ResolverConfig};
pub use state::{FileStore, NullStore, StateStore};
