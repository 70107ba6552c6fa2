//! The seam between the containerd task service and a VM sandbox.
//!
//! [`SandboxFactory::create`] starts a sandbox (virtiofsd, the VM with the
//! share cold-plugged, the agent); the [`Sandbox`] it returns does what the
//! service needs: expose a container's rootfs and bind mounts in the share,
//! attach/detach its devices through the device manager, and call the
//! guest agent. [`qemu::QemuSandbox`] is the real one; [`fake::FakeSandbox`]
//! records calls and fails on request, for the service's unit tests.
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use capsule_agent_protocol::agent;
use oci_spec::runtime::Spec;

use crate::config::Config;
use crate::error::Result;
use crate::mount::RootfsMount;

pub mod convert;
pub mod devices;
pub mod fake;
pub mod qemu;
pub mod share;
pub mod virtiofsd;

/// The virtio-fs tag of the sandbox share (the agent mounts it at
/// `/run/capsule/shared`).
pub const SHARE_TAG: &str = "capsule-shared";
/// Where the agent mounts the share in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/capsule/shared";

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

/// A device attached for a container.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachedDevice {
    /// Device manager id (`dev3`).
    pub id: String,
    pub info: capsule_devmgr::DeviceInfo,
    /// What the agent gets.
    pub agent: agent::Device,
}

/// Exit of a guest process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub status: u32,
    pub exited_at_secs: i64,
    pub exited_at_nanos: u32,
}

impl ExitStatus {
    /// An exit observed now (VM gone, process lost).
    pub fn now(status: u32) -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            status,
            exited_at_secs: d.as_secs() as i64,
            exited_at_nanos: d.subsec_nanos(),
        }
    }
}

/// Guest cgroup statistics of a container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestStats {
    pub cgroup: agent::CgroupStats,
    /// "v1" or "v2".
    pub version: String,
}

/// A running sandbox.
#[async_trait]
pub trait Sandbox: Send + Sync {
    fn id(&self) -> &str;
    /// The host pid standing for the sandbox (QEMU's).
    fn pid(&self) -> u32;

    /// Mounts the container's rootfs in its bundle and exposes it (and its
    /// bind-mount sources) in the share. All or nothing.
    async fn prepare_rootfs(&self, c: &ContainerRequest) -> Result<SharedRootfs>;
    /// Undoes [`prepare_rootfs`](Self::prepare_rootfs); idempotent.
    async fn release_rootfs(&self, cid: &str, bundle: &std::path::Path) -> Result<()>;
    /// Resolves and attaches the spec's `linux.devices` (shared devices are
    /// counted, not plugged twice). All or nothing.
    async fn attach_devices(&self, cid: &str, spec: &Spec) -> Result<Vec<AttachedDevice>>;
    /// Drops the container's uses; a device is unplugged with its last user.
    async fn detach_devices(&self, cid: &str, devices: &[AttachedDevice]) -> Result<()>;

    // The guest agent.
    async fn create_container(&self, req: agent::CreateContainerRequest) -> Result<()>;
    async fn start_container(&self, cid: &str) -> Result<u32>;
    async fn exec_process(
        &self,
        cid: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdin: bool,
    ) -> Result<u32>;
    async fn signal_process(&self, cid: &str, exec_id: &str, signal: u32, all: bool) -> Result<()>;
    /// Waits for the process to exit (no deadline).
    async fn wait_process(&self, cid: &str, exec_id: &str) -> Result<ExitStatus>;
    /// Output; empty at end of stream.
    async fn read_output(
        &self,
        cid: &str,
        exec_id: &str,
        stderr: bool,
        len: u32,
    ) -> Result<Vec<u8>>;
    async fn write_stdin(&self, cid: &str, exec_id: &str, data: &[u8]) -> Result<usize>;
    async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<()>;
    async fn resize_pty(&self, cid: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()>;
    async fn pause(&self, cid: &str) -> Result<()>;
    async fn resume(&self, cid: &str) -> Result<()>;
    /// `resources`: OCI LinuxResources JSON.
    async fn update(&self, cid: &str, resources: Vec<u8>) -> Result<()>;
    async fn stats(&self, cid: &str) -> Result<GuestStats>;
    /// (guest pid, exec id) of every process.
    async fn list_processes(&self, cid: &str) -> Result<Vec<(u32, String)>>;
    async fn remove_container(&self, cid: &str) -> Result<()>;

    /// The VM's real devices, as JSON (for `capsule inspect`).
    async fn vm_devices(&self) -> Result<serde_json::Value>;

    /// Stops the VM and virtiofsd and removes the sandbox's state.
    async fn shutdown(&self) -> Result<()>;
}

/// Starts sandboxes.
#[async_trait]
pub trait SandboxFactory: Send + Sync {
    /// Checks, on the host only, that the spec's devices can be resolved,
    /// so that a bad device fails before a VM boots. The attach itself
    /// checks again.
    fn check_devices(&self, _config: &Config, _spec: &Spec) -> Result<()> {
        Ok(())
    }

    /// Starts sandbox `id` in `dir` (exists, holds the container list);
    /// `hostname` from the first container. On error nothing it started is
    /// left running.
    async fn create(
        &self,
        id: &str,
        config: &Config,
        hostname: &str,
        shim_address: &str,
    ) -> Result<Arc<dyn Sandbox>>;
}
