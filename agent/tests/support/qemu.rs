//! The test VM, booted through the project's one QEMU launcher
//! (`capsule-hypervisor`) the way the shim boots a sandbox: virtiofsd
//! serves the share, a [`VmSlot`] takes the virtio-fs device (and any
//! other cold-plugged device) from a device manager before boot, then
//! starts QEMU; hotplug goes through the same managers afterwards.
//!
//! Two device managers share the VM, because one manager has one block
//! driver (as one sandbox does): [`Vm::blk`] (virtio-blk disks, vhost-user
//! devices, the share; owns every PCI slot of the layout) and [`Vm::scsi`]
//! (scsi-hd disks on the `scsi0` controller; no PCI slots). The second
//! manager's ids are prefixed with `s` on the way to QEMU (`sdev0`), so
//! the two never name a QEMU object alike.
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use capsule_devmgr::device::VhostUserKind;
use capsule_devmgr::testing::ManagerTestExt;
use capsule_devmgr::{AttachRequest, BackendError, DeviceBackend, UnplugOutcome};
use capsule_devmgr::{
    BlockDriver, DeviceId, DeviceKind, DeviceManager, GuestAddress, HostDevice, ManagerConfig,
    NullStore,
};
use capsule_hypervisor::config::{AccelMode, AgentConfig, VmConfig, VsockMode};
use capsule_hypervisor::testkit::{require_qemu, Daemon};
use capsule_hypervisor::{QemuVm, VmSlot};

pub struct VmOptions {
    pub memory_mb: u64,
    /// Extra kernel command line words.
    pub cmdline: String,
    /// Devices cold-plugged through [`Vm::blk`] before boot (after the
    /// share); their ids and addresses end up in [`Vm::coldplugged`].
    pub coldplug: Vec<HostDevice>,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            memory_mb: 512,
            cmdline: String::new(),
            coldplug: Vec::new(),
        }
    }
}

/// A running guest. QEMU is killed on drop unless [`Vm::shutdown`] stopped
/// it; virtiofsd is killed after it.
pub struct Vm {
    pub vm: QemuVm,
    pub slot: Arc<VmSlot>,
    /// virtio-blk disks, vhost-user devices and the virtio-fs share.
    pub blk: DeviceManager,
    /// scsi-hd disks (driver virtio-scsi).
    pub scsi: DeviceManager,
    /// The virtio-fs share's device in [`Vm::blk`].
    pub share: DeviceId,
    /// [`VmOptions::coldplug`] in order: manager id and guest address.
    pub coldplugged: Vec<(DeviceId, GuestAddress)>,
    /// QEMU's chardev socket for `agent.channel.0`.
    pub agent_socket: PathBuf,
    /// QMP socket (the [`QemuVm`] holds the session; `vm.disconnect()` first
    /// to talk to QEMU with another client).
    pub qmp_socket: PathBuf,
    /// Host directory shared as virtio-fs tag `capsule-shared`.
    pub shared_dir: PathBuf,
    pub console_log: PathBuf,
    pub run_dir: PathBuf,
    stderr_log: PathBuf,
    virtiofsd: Daemon,
    /// Last: removed after everything else is gone.
    dir: tempfile::TempDir,
}

/// The accelerator: `CAPSULE_TEST_ACCEL` = `tcg` (default), `kvm` or `auto`.
pub fn accel_mode() -> AccelMode {
    match std::env::var("CAPSULE_TEST_ACCEL").as_deref() {
        Err(_) | Ok("tcg") | Ok("") => AccelMode::Tcg,
        Ok("kvm") => AccelMode::Kvm,
        Ok("auto") => AccelMode::Auto,
        Ok(other) => panic!("CAPSULE_TEST_ACCEL={other:?}: expected tcg, kvm or auto"),
    }
}

/// Prefixes the ids of one manager's requests (see the module docs).
struct Prefixed {
    prefix: &'static str,
    inner: Arc<VmSlot>,
}

impl Prefixed {
    fn req(&self, req: &AttachRequest) -> AttachRequest {
        let mut r = req.clone();
        r.id = format!("{}{}", self.prefix, req.id);
        r
    }
}

#[async_trait]
impl DeviceBackend for Prefixed {
    async fn hotplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        self.inner.hotplug(&self.req(req)).await
    }
    async fn unplug(&self, req: &AttachRequest) -> Result<UnplugOutcome, BackendError> {
        self.inner.unplug(&self.req(req)).await
    }
    async fn coldplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        self.inner.coldplug(&self.req(req)).await
    }
}

/// The id QEMU (and the disk serial) knows a [`Vm::scsi`] device by.
pub const SCSI_ID_PREFIX: &str = "s";

impl Vm {
    pub async fn boot(opts: VmOptions) -> Vm {
        let (kernel, initrd) = super::guest_images();
        let qemu = require_qemu();
        let dir = tempfile::Builder::new()
            .prefix("capsule-agent-vm")
            .tempdir()
            .expect("tempdir");
        let base = dir.path().to_path_buf();
        let shared = base.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        let vfs_sock = base.join("vfs.sock");
        let virtiofsd = Daemon::virtiofsd(&shared, &vfs_sock, &base.join("virtiofsd.log"))
            .unwrap_or_else(|e| panic!("{e:#}"));

        let mut cfg = VmConfig::new(base.join("run"));
        cfg.qemu_binary = qemu;
        cfg.memory_mb = opts.memory_mb;
        cfg.shared_memory = true;
        cfg.kernel = Some(kernel);
        cfg.initrd = Some(initrd);
        cfg.cmdline = format!("console=ttyS0 panic=-1 quiet {}", opts.cmdline)
            .trim()
            .to_owned();
        cfg.accel = accel_mode();
        cfg.agent = AgentConfig {
            vsock: VsockMode::Off,
            ..AgentConfig::default()
        };
        // The scsi0 controller, for the scsi manager's disks.
        cfg.block_driver = BlockDriver::VirtioScsi;
        cfg.die_with_parent = true;
        cfg.timeouts.startup_ms = 30_000;
        cfg.timeouts.unplug_ms = 15_000;
        cfg.timeouts.qmp_command_ms = 15_000;
        let (agent_socket, qmp_socket, console_log, stderr_log) = (
            cfg.agent_socket(),
            cfg.qmp_socket(),
            cfg.console_log(),
            cfg.stderr_log(),
        );
        let run_dir = cfg.run_dir.clone();
        let slots = capsule_hypervisor::launch::layout_of(&cfg).device_slot_range();
        let slot = Arc::new(VmSlot::new(cfg).unwrap_or_else(|e| panic!("VM config: {e}")));
        let blk = DeviceManager::new(
            ManagerConfig::new(BlockDriver::VirtioBlk, slots.clone()),
            slot.clone(),
            NullStore,
        )
        .unwrap();
        let scsi = DeviceManager::new(
            ManagerConfig::new(BlockDriver::VirtioScsi, slots.end..slots.end),
            Arc::new(Prefixed {
                prefix: SCSI_ID_PREFIX,
                inner: slot.clone(),
            }),
            NullStore,
        )
        .unwrap();

        let share = blk
            .add(HostDevice {
                info: None,
                host_path: shared.clone(),
                kind: DeviceKind::VhostUser {
                    vhost: VhostUserKind::Fs,
                    socket: vfs_sock,
                    tag: super::SHARE_TAG.into(),
                },
            })
            .unwrap();
        blk.coldplug(&share)
            .await
            .unwrap_or_else(|e| panic!("cold-plugging the virtio-fs share: {e}"));
        let mut coldplugged = Vec::new();
        for dev in opts.coldplug {
            let what = format!("{:?}", dev.host_path);
            let id = blk.add(dev).unwrap();
            let addr = blk
                .coldplug(&id)
                .await
                .unwrap_or_else(|e| panic!("cold-plugging {what}: {e}"));
            coldplugged.push((id, addr));
        }
        let vm = match slot.start().await {
            Ok(vm) => vm,
            Err(e) => panic!(
                "starting the VM: {e}\n--- qemu stderr ---\n{}",
                std::fs::read_to_string(&stderr_log).unwrap_or_default()
            ),
        };
        Vm {
            vm,
            slot,
            blk,
            scsi,
            share,
            coldplugged,
            agent_socket,
            qmp_socket,
            shared_dir: shared,
            console_log,
            run_dir,
            stderr_log,
            virtiofsd,
            dir,
        }
    }

    pub fn console(&self) -> String {
        let mut s = std::fs::read_to_string(&self.console_log).unwrap_or_default();
        if let Ok(q) = std::fs::read_to_string(&self.stderr_log) {
            if !q.is_empty() {
                s.push_str("\n--- qemu stderr ---\n");
                s.push_str(&q);
            }
        }
        s
    }

    /// The temp dir holding the VM's files (a place for disk images).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Stops QEMU (QMP quit, then signals) and virtiofsd; checks both are
    /// gone.
    pub async fn shutdown(mut self) {
        let pid = self.vm.pid();
        self.slot
            .stop()
            .await
            .unwrap_or_else(|e| panic!("stopping the VM: {e}"));
        assert!(self.vm.process().has_exited(), "QEMU {pid} still runs");
        self.virtiofsd.kill();
        assert!(!self.virtiofsd.is_running(), "virtiofsd still runs");
        for f in [&self.agent_socket, &self.qmp_socket] {
            assert!(!f.exists(), "{} left behind", f.display());
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A test that failed before `shutdown`: never leave QEMU running.
        if !self.vm.process().has_exited() {
            let _ = self.vm.process().signal(libc::SIGKILL);
        }
        if std::env::var("CAPSULE_TEST_KEEP").is_ok() {
            let keep = std::env::temp_dir()
                .join(format!("capsule-agent-console-{}.log", std::process::id()));
            let _ = std::fs::copy(&self.console_log, &keep);
        }
    }
}
