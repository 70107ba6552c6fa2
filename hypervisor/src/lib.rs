//! capsule hypervisor backend: QEMU VMs with first-class device hotplug.
//!
//! - [`VmBuilder`] ([`launch`]): a VM being configured, the
//!   [`DeviceBackend`] that cold-plugs; `start` picks the accelerator,
//!   builds the command line and spawns QEMU.
//! - [`QemuVm`]: a running VM: [`qmp`] (async QMP client), [`hotplug`]
//!   (pure per-kind plans, then an executor with rollback; unplug),
//!   [`process`] (single reaper, pidfd signals), its real device list, stop,
//!   re-attach from a [`VmDescription`].
//! - [`VmSlot`]: one `DeviceBackend` for a sandbox's whole life (cold-plug
//!   before boot, hotplug after), for the device manager to hold.
//! - `testkit` (feature `testkit`): host resources for real-QEMU tests.
//!
//! It depends on the device seam (`capsule-device-api`) only: the device
//! manager allocates every address, this crate plugs what it is given.
pub use capsule_device_api::DeviceBackend;

pub mod accel;
pub mod config;
pub mod description;
pub mod devices;
pub mod error;
pub mod hotplug;
pub mod launch;
pub mod layout;
pub mod naming;
pub mod pci_path;
pub mod process;
pub mod qmp;
pub mod slot;
pub mod tap_fds;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod vhost_probe;
pub mod vm;

pub use config::{Accel, AccelMode, MachineType, VmConfig};
pub use description::VmDescription;
pub use devices::{VmDevice, VmDevices};
pub use error::HypervisorError;
pub use launch::{DescriptionRecorder, VmBuilder};
pub use process::ExitInfo;
pub use slot::VmSlot;
pub use tap_fds::TapFds;
pub use vm::QemuVm;
