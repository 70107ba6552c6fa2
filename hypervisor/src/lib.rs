//! capsule hypervisor backend: QEMU VMs with first-class device hotplug.
//!
//! - [`Hypervisor`] / [`PreparedVm`] / [`RunningVm`]: the VM lifecycle
//!   (prepare with cold-plugged devices, start, hotplug through the device
//!   manager's [`DeviceBackend`], list the real devices, stop, re-attach).
//! - [`Qemu`] implements it: [`launch`] (command line, accelerator probe,
//!   spawn), [`qmp`] (async QMP client), [`hotplug`] (per-kind plans with
//!   rollback, unplug), [`process`] (single reaper, pidfd signals),
//!   [`description`] (persisted state for re-attach).
//! - [`VmSlot`]: one `DeviceBackend` for a sandbox's whole life (cold-plug
//!   before boot, hotplug after), for the device manager to hold.
//! - `testkit` (feature `testkit`): host resources for real-QEMU tests.
use async_trait::async_trait;
use tokio::sync::watch;

pub use capsule_devmgr::backend::DeviceBackend;

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
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod vhost_probe;
pub mod vm;

pub use config::{Accel, AccelMode, MachineType, VmConfig};
pub use description::VmDescription;
pub use devices::{VmDevice, VmDevices};
pub use error::HypervisorError;
pub use launch::VmBuilder;
pub use process::ExitInfo;
pub use slot::VmSlot;
pub use vm::QemuVm;

/// A VM that has not started: devices are cold-plugged through its
/// [`DeviceBackend::coldplug`].
#[async_trait]
pub trait PreparedVm: DeviceBackend + Sized {
    type Vm: RunningVm;
    async fn start(self) -> Result<Self::Vm, HypervisorError>;
}

/// A running VM: hotplug and unplug through its [`DeviceBackend`].
#[async_trait]
pub trait RunningVm: DeviceBackend {
    fn pid(&self) -> u32;
    /// What a later process needs to re-attach.
    fn description(&self) -> &VmDescription;
    /// Turns `Some` when the VM process is gone.
    fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>>;
    /// The devices QEMU really has (for reconciliation after a restart).
    async fn devices(&self) -> Result<VmDevices, HypervisorError>;
    async fn stop(&self) -> Result<(), HypervisorError>;
}

/// A hypervisor driver.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    type Prepared: PreparedVm<Vm = Self::Vm>;
    type Vm: RunningVm;
    /// Validates `config` and returns a VM to cold-plug devices into.
    fn prepare(&self, config: VmConfig) -> Result<Self::Prepared, HypervisorError>;
    /// Re-attaches to a running VM; refuses a pid whose start time differs.
    async fn attach(&self, desc: VmDescription) -> Result<Self::Vm, HypervisorError>;
}

/// The QEMU driver.
#[derive(Debug, Clone, Copy, Default)]
pub struct Qemu;

#[async_trait]
impl Hypervisor for Qemu {
    type Prepared = VmBuilder;
    type Vm = QemuVm;
    fn prepare(&self, config: VmConfig) -> Result<VmBuilder, HypervisorError> {
        VmBuilder::new(config)
    }
    async fn attach(&self, desc: VmDescription) -> Result<QemuVm, HypervisorError> {
        QemuVm::attach(desc).await
    }
}

#[async_trait]
impl PreparedVm for VmBuilder {
    type Vm = QemuVm;
    async fn start(self) -> Result<QemuVm, HypervisorError> {
        VmBuilder::start(self).await
    }
}
