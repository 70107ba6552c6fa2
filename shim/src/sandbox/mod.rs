//! The seam between the containerd task service and a VM sandbox, in two
//! parts:
//!
//! - [`Sandbox`]: the host resources of a running sandbox: a container's
//!   rootfs and bind mounts in the virtio-fs share, its devices (through
//!   the device manager, which owns them), the VM's real device list, and
//!   shutdown;
//! - [`Guest`]: the calls that go straight to the guest agent.
//!
//! [`SandboxFactory`] resolves a container's devices on the host (once, at
//! Create) and starts sandboxes. [`qemu::QemuSandbox`] is the real one;
//! `fake::FakeSandbox` (tests) records calls and fails on request.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use capsule_agent_protocol::agent;
use capsule_devmgr::{ContainerDevice, ResolvedDevices};
use oci_spec::runtime::Spec;

use crate::config::Config;
use crate::error::Result;
use crate::mount::RootfsMount;
use crate::state::SandboxStore;

pub mod convert;
#[cfg(test)]
pub mod fake;
mod guest;
pub mod host_share;
pub mod network;
pub mod qemu;
pub mod share;
pub mod virtiofsd;

pub use guest::{ExitStatus, Guest, GuestStats};

/// The virtio-fs tag of the sandbox share (the agent mounts it at
/// `/run/capsule/shared`).
pub const SHARE_TAG: &str = "capsule-shared";
/// Where the agent mounts the share in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/capsule/shared";

/// What starting a sandbox needs to know of its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSetup {
    /// The guest's hostname (empty: the guest's default).
    pub hostname: String,
    /// The pod's network namespace (QEMU runs in it).
    pub network: network::PodNetwork,
    /// The pod has no pause container (containerd's Sandbox API): the guest
    /// agent makes the pod's pid, ipc and uts namespaces, held by a process
    /// of its own whose guest pid is [`Sandbox::pod_pid`].
    pub pod_namespaces: bool,
}

impl SandboxSetup {
    /// From the spec of the sandbox's first container (a pod's pause
    /// container, or a lone container): its hostname and network
    /// namespace. A spec without a network namespace (host network) is
    /// refused.
    pub fn from_spec(spec: &Spec) -> Result<Self> {
        Ok(Self {
            hostname: spec.hostname().clone().unwrap_or_default(),
            network: network::pod_network(spec)?,
            pod_namespaces: false,
        })
    }
}

/// A container as the sandbox needs it.
#[derive(Debug, Clone)]
pub struct ContainerRequest {
    pub id: String,
    pub bundle: PathBuf,
    /// `CreateTaskRequest.rootfs` (empty: `bundle/rootfs` is ready as is).
    pub rootfs: Vec<RootfsMount>,
    pub spec: Spec,
}

/// A container's filesystem as the guest sees it.
#[derive(Debug, Clone)]
pub struct SharedRootfs {
    /// Rootfs for the agent, relative to the share (`<cid>/rootfs`).
    pub guest_rootfs: String,
    /// The spec with host bind-mount sources rewritten to share paths.
    pub spec: Spec,
    /// Host mount points created (for the record).
    pub share_mounts: Vec<PathBuf>,
    /// Whether `bundle/rootfs` was mounted.
    pub rootfs_mounted: bool,
}

/// A running sandbox: its host resources, and its guest.
#[async_trait]
pub trait Sandbox: Send + Sync {
    fn id(&self) -> &str;
    /// QEMU's pid: the sandbox as a host process.
    fn vm_pid(&self) -> u32;
    /// The guest pid of the pod's pause process, which holds the pod's
    /// namespaces, when the sandbox was started with
    /// [`SandboxSetup::pod_namespaces`].
    fn pod_pid(&self) -> Option<u32>;
    /// Resolves once the VM has ended: status 0 when
    /// [`shutdown`](Self::shutdown) stopped it, 255 when it ended on its own
    /// (QEMU died, or virtiofsd did and took the VM down).
    async fn wait_exit(&self) -> ExitStatus;
    /// The guest agent.
    fn guest(&self) -> &dyn Guest;

    /// Mounts the container's rootfs in its bundle and exposes it (and its
    /// bind-mount sources) in the share. All or nothing.
    async fn prepare_rootfs(&self, c: &ContainerRequest) -> Result<SharedRootfs>;
    /// Undoes [`prepare_rootfs`](Self::prepare_rootfs); idempotent.
    async fn release_rootfs(&self, cid: &str, bundle: &Path) -> Result<()>;
    /// Attaches the container's devices (resolved at Create); shared
    /// devices are counted, not plugged twice. All or nothing.
    async fn attach_devices(
        &self,
        cid: &str,
        devices: ResolvedDevices,
    ) -> Result<Vec<ContainerDevice>>;
    /// Drops every device use of the container; a device is unplugged with
    /// its last user.
    async fn detach_devices(&self, cid: &str) -> Result<()>;

    /// Before the sandbox's own first Start: plugs the pod network's
    /// endpoints that appeared since Create (CNI may run between the two)
    /// and configures the guest's network. Idempotent.
    async fn network_ready(&self) -> Result<()>;

    /// The VM's real devices, as JSON (for `capsule inspect`).
    async fn vm_devices(&self) -> Result<serde_json::Value>;

    /// Stops the VM and virtiofsd and removes the sandbox's state.
    async fn shutdown(&self) -> Result<()>;
}

/// Starts sandboxes.
#[async_trait]
pub trait SandboxFactory: Send + Sync {
    /// Translates and resolves the spec's `linux.devices` on the host, once
    /// per Create and before any VM boots, so a bad device fails first; the
    /// attach uses exactly what this returns.
    fn resolve_devices(&self, config: &Config, spec: &Spec) -> Result<ResolvedDevices>;

    /// Starts sandbox `id`, recording it in `store` (the sandbox's state
    /// directory exists; it holds the first container when a Create starts
    /// the sandbox). On error nothing it started is left running.
    async fn create(
        &self,
        id: &str,
        config: &Config,
        store: Arc<SandboxStore>,
        setup: &SandboxSetup,
    ) -> Result<Arc<dyn Sandbox>>;
}

/// The agent's view of one container device.
pub fn agent_devices(devices: &[ContainerDevice]) -> Result<Vec<agent::Device>> {
    devices.iter().map(convert::agent_device).collect()
}
