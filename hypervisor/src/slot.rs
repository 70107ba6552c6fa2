//! One [`DeviceBackend`] for a sandbox's whole life: the device manager
//! keeps a single backend, while the VM goes from "being configured"
//! (cold-plug) to "running" (hotplug) to "stopped".
use async_trait::async_trait;
use tokio::sync::RwLock;

use capsule_device_api::GuestAddress;
use capsule_device_api::{
    AttachRequest, BackendError, BackendErrorKind, DeviceBackend, UnplugOutcome,
};

use crate::config::VmConfig;
use crate::description::VmDescription;
use crate::error::HypervisorError;
use crate::launch::VmBuilder;
use crate::vm::QemuVm;

enum State {
    Preparing(Box<VmBuilder>),
    /// `start` in progress or failed: the builder is consumed.
    Starting,
    Running(QemuVm),
    Stopped,
}

/// A sandbox VM as the device manager sees it, before and after boot.
pub struct VmSlot {
    state: RwLock<State>,
    taps: std::sync::Arc<crate::TapFds>,
}

impl std::fmt::Debug for VmSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSlot").finish_non_exhaustive()
    }
}

impl VmSlot {
    /// A VM to cold-plug into, then [`start`](Self::start).
    pub fn new(config: VmConfig) -> Result<Self, HypervisorError> {
        Ok(Self::from_builder(VmBuilder::new(config)?))
    }

    /// [`new`](Self::new) from a configured builder (e.g. with a
    /// description recorder).
    pub fn from_builder(builder: VmBuilder) -> Self {
        Self {
            taps: builder.taps(),
            state: RwLock::new(State::Preparing(Box::new(builder))),
        }
    }

    /// Hands over the queue descriptors of a network endpoint's `tap`, for
    /// its cold-plug or hotplug (whichever comes).
    pub fn hand_over_tap(&self, tap: &str, queues: Vec<std::os::fd::OwnedFd>) {
        self.taps.hand_over(tap, queues);
    }

    /// A slot for a VM that already runs (re-attached from its description).
    pub async fn attach(desc: VmDescription) -> Result<Self, HypervisorError> {
        Ok(Self::running(QemuVm::attach(desc).await?))
    }

    pub fn running(vm: QemuVm) -> Self {
        Self {
            taps: vm.taps(),
            state: RwLock::new(State::Running(vm)),
        }
    }

    /// Boots the VM with everything cold-plugged so far. Waits for
    /// in-flight cold-plugs.
    pub async fn start(&self) -> Result<QemuVm, HypervisorError> {
        let mut st = self.state.write().await;
        let builder = match std::mem::replace(&mut *st, State::Starting) {
            State::Preparing(b) => b,
            other => {
                let what = match &other {
                    State::Running(_) => "already running",
                    State::Stopped => "stopped",
                    _ => "a previous start failed",
                };
                *st = other;
                return Err(HypervisorError::Config(format!(
                    "cannot start the VM: it is {what}"
                )));
            }
        };
        let vm = builder.start().await?;
        *st = State::Running(vm.clone());
        Ok(vm)
    }

    /// The running VM, if any.
    pub async fn vm(&self) -> Option<QemuVm> {
        match &*self.state.read().await {
            State::Running(vm) => Some(vm.clone()),
            _ => None,
        }
    }

    /// Stops the VM (if running); later device calls are refused.
    pub async fn stop(&self) -> Result<(), HypervisorError> {
        let mut st = self.state.write().await;
        if let State::Running(vm) = &*st {
            vm.stop().await?;
        }
        *st = State::Stopped;
        Ok(())
    }
}

fn not_running(id: &str, what: &str) -> BackendError {
    BackendError::new(
        BackendErrorKind::Unsupported,
        format!("device {id}: the VM {what}"),
    )
}

#[async_trait]
impl DeviceBackend for VmSlot {
    async fn hotplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        let vm = match &*self.state.read().await {
            State::Running(vm) => vm.clone(),
            State::Preparing(_) => {
                return Err(not_running(&req.id, "has not started; cold-plug instead"))
            }
            State::Starting => return Err(not_running(&req.id, "is starting or failed to start")),
            State::Stopped => return Err(not_running(&req.id, "is stopped")),
        };
        vm.hotplug(req).await
    }

    async fn unplug(&self, req: &AttachRequest) -> Result<UnplugOutcome, BackendError> {
        let st = self.state.read().await;
        match &*st {
            State::Running(vm) => {
                let vm = vm.clone();
                drop(st);
                vm.unplug(req).await
            }
            State::Preparing(b) => b.unplug(req).await,
            // Nothing of a stopped VM remains to hold the device.
            State::Stopped => Ok(UnplugOutcome::Removed),
            State::Starting => Err(not_running(&req.id, "is starting or failed to start")),
        }
    }

    async fn coldplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        match &*self.state.read().await {
            State::Preparing(b) => b.coldplug(req).await,
            State::Running(_) => Err(not_running(&req.id, "is already running; hotplug instead")),
            State::Starting => Err(not_running(&req.id, "is starting or failed to start")),
            State::Stopped => Err(not_running(&req.id, "is stopped")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_device_api::DeviceKind;

    fn req(id: &str) -> AttachRequest {
        AttachRequest {
            id: id.into(),
            kind: DeviceKind::Generic,
            host_path: "/dev/null".into(),
            read_only: false,
            driver: None,
            block_index: None,
            drive_name: None,
            scsi_addr: None,
            pmem_index: None,
            pci_slots: vec![],
        }
    }

    #[tokio::test]
    async fn routes_by_state() {
        let dir = tempfile::tempdir().unwrap();
        let slot = VmSlot::new(VmConfig::new(dir.path())).unwrap();
        assert_eq!(slot.coldplug(&req("g1")).await.unwrap(), GuestAddress::None);
        let e = slot.hotplug(&req("g2")).await.unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Unsupported);
        assert!(e.message.contains("cold-plug"), "{e}");
        assert_eq!(
            slot.unplug(&req("g1")).await.unwrap(),
            UnplugOutcome::Removed
        );
        assert!(slot.vm().await.is_none());
        slot.stop().await.unwrap();
        assert!(slot
            .coldplug(&req("g3"))
            .await
            .unwrap_err()
            .message
            .contains("stopped"));
        assert!(slot.start().await.is_err());
    }
}
