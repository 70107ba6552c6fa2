//! capsule device manager.
//!
//! Turns OCI `linux.devices` entries into typed devices ([`resolve`]), keeps
//! their reference and attach counts and guest addresses ([`manager`]), and
//! persists every sandbox's devices atomically ([`state`]). It drives a
//! hypervisor only through the [`backend::DeviceBackend`] trait.
pub mod alloc;
pub mod backend;
pub mod device;
pub mod manager;
pub mod oci;
pub mod resolve;
pub mod state;
pub mod testing;
pub mod uevent;
pub mod vfio;
pub mod vhost_store;

pub use backend::{AttachRequest, BackendError, BackendErrorKind, DeviceBackend, UnplugOutcome};
pub use device::{BlockDriver, DeviceInfo, DeviceKind, GuestAddress, HostDevice};
pub use manager::{
    DetachOutcome, DeviceId, DeviceManager, DeviceRecord, DeviceStatus, ManagerConfig, ManagerError,
};
pub use resolve::{ResolveError, Resolver, ResolverConfig};
pub use state::{FileStore, NullStore, StateStore};
