//! VM configuration (serde). Nothing here is a hard-coded host path: every
//! binary, image, socket and cache location comes from the config.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use capsule_device_api::BlockDriver;

/// QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    /// i440FX: devices hotplug straight into `pci.0` slots (ACPI hotplug).
    #[default]
    Pc,
    /// Q35: devices hotplug into pre-created `pcie-root-port`s.
    Q35,
}

impl MachineType {
    pub fn qemu_name(self) -> &'static str {
        match self {
            MachineType::Pc => "pc",
            MachineType::Q35 => "q35",
        }
    }
    /// The root bus name.
    pub fn root_bus(self) -> &'static str {
        match self {
            MachineType::Pc => "pci.0",
            MachineType::Q35 => "pcie.0",
        }
    }
}

/// Requested acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    /// KVM when it really works on this host (probed, verdict cached), TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The acceleration a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// Whether to add a `vhost-vsock-pci` device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VsockMode {
    /// Only when the host has the vhost-vsock device node.
    #[default]
    Auto,
    On,
    Off,
}

/// Host ↔ guest agent channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Unix socket QEMU listens on for the `agent.channel.0` virtio-serial
    /// port (default `<run_dir>/agent.sock`).
    pub socket: Option<PathBuf>,
    pub vsock: VsockMode,
    pub guest_cid: u32,
    /// The host's vhost-vsock node, checked in `auto` mode.
    pub vhost_vsock_device: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            socket: None,
            vsock: VsockMode::Auto,
            guest_cid: 3,
            vhost_vsock_device: "/dev/vhost-vsock".into(),
        }
    }
}

/// nvdimm (pmem) support: `-machine nvdimm=on -m <M>,slots=S,maxmem=X`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemConfig {
    /// Memory hotplug slots (one per nvdimm).
    pub slots: u32,
    /// Upper bound of RAM + every nvdimm, in MiB.
    pub maxmem_mb: u64,
}

/// Deadlines, in milliseconds. Every wait capsule does has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Any single QMP command.
    pub qmp_command_ms: u64,
    /// From spawn until QMP is negotiated.
    pub startup_ms: u64,
    /// Waiting for the guest to acknowledge an unplug (`DEVICE_DELETED`).
    pub unplug_ms: u64,
    /// A vhost-user backend answering `VHOST_USER_GET_FEATURES`.
    pub vhost_probe_ms: u64,
    /// `quit`, then SIGTERM, then SIGKILL: each waits this long.
    pub stop_quit_ms: u64,
    pub stop_term_ms: u64,
    pub stop_kill_ms: u64,
    /// KVM_RUN smoke test.
    pub kvm_smoke_ms: u64,
    /// KVM boot probe (kernel + initramfs with `capsule.probe=1`).
    pub kvm_boot_probe_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            qmp_command_ms: 10_000,
            startup_ms: 10_000,
            unplug_ms: 5_000,
            vhost_probe_ms: 2_000,
            stop_quit_ms: 5_000,
            stop_term_ms: 3_000,
            stop_kill_ms: 3_000,
            kvm_smoke_ms: 2_000,
            kvm_boot_probe_ms: 20_000,
        }
    }
}

impl Timeouts {
    pub fn qmp_command(&self) -> Duration {
        Duration::from_millis(self.qmp_command_ms)
    }
    pub fn startup(&self) -> Duration {
        Duration::from_millis(self.startup_ms)
    }
    pub fn unplug(&self) -> Duration {
        Duration::from_millis(self.unplug_ms)
    }
    pub fn vhost_probe(&self) -> Duration {
        Duration::from_millis(self.vhost_probe_ms)
    }
}

/// Everything needed to launch one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// QEMU binary: a path, or a name looked up in `PATH`.
    #[serde(default = "default_qemu")]
    pub qemu_binary: PathBuf,
    /// Directory for this VM's sockets, pidfile, logs and description.
    pub run_dir: PathBuf,
    #[serde(default)]
    pub machine: MachineType,
    /// `pcie-root-port`s created on q35 (hotplug targets `rp0..rpN-1`).
    #[serde(default = "default_root_ports")]
    pub pcie_root_ports: u32,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mb: u64,
    /// Guest RAM on a shared memfd (`share=on`): required by vhost-user.
    #[serde(default = "default_true")]
    pub shared_memory: bool,
    /// Guest kernel; `None` boots no OS (firmware only).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub accel: AccelMode,
    /// Where the KVM verdict is cached; `None` probes on every start.
    #[serde(default)]
    pub accel_cache_dir: Option<PathBuf>,
    #[serde(default)]
    pub agent: AgentConfig,
    /// The sandbox's block driver: `virtio-scsi` adds the `scsi0` controller.
    #[serde(default)]
    pub block_driver: BlockDriver,
    #[serde(default)]
    pub pmem: Option<PmemConfig>,
    /// Add a virtio-rng device (without it a TCG guest's crng is seeded
    /// only seconds after boot and `getrandom()` blocks until then).
    #[serde(default = "default_true")]
    pub rng: bool,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Kill QEMU when the thread that spawned it dies (PR_SET_PDEATHSIG).
    /// For tests: a runtime that must survive its own restart leaves it off.
    #[serde(default)]
    pub die_with_parent: bool,
    /// TCG's translation cache, MiB (`-accel tcg,tb-size=`), instead of
    /// QEMU's 1 GiB default. The cache is host memory of its own (a
    /// sandbox's largest share after guest RAM): with 64 MiB the boot fills
    /// 47 MiB of it; with 16, the boot takes about 8% longer (measured:
    /// `ctr run --rm … true` 1.80 s against 1.95 s) for 35 MiB less.
    #[serde(default = "default_tb_size")]
    pub tcg_tb_size_mib: u32,
    /// A virtio-balloon with free page reporting: pages the guest frees go
    /// back to the host (also with the shared memfd backend).
    #[serde(default = "default_true")]
    pub balloon: bool,
    /// Start QEMU in this network namespace (the pod's): QEMU needs no host
    /// network, and a task pid of QEMU's then names the pod's namespace.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Run QEMU under its seccomp sandbox (`-sandbox on,...`: no obsolete
    /// syscalls, privilege changes, fork/exec or resource control).
    #[serde(default = "default_true")]
    pub seccomp_sandbox: bool,
}

fn default_qemu() -> PathBuf {
    "qemu-system-x86_64".into()
}
fn default_root_ports() -> u32 {
    8
}
fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    256
}
fn default_true() -> bool {
    true
}
fn default_tb_size() -> u32 {
    16
}

impl VmConfig {
    /// A config with defaults for everything but the run directory.
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        Self {
            qemu_binary: default_qemu(),
            run_dir: run_dir.into(),
            machine: MachineType::default(),
            pcie_root_ports: default_root_ports(),
            vcpus: default_vcpus(),
            memory_mb: default_memory(),
            shared_memory: true,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            accel: AccelMode::default(),
            accel_cache_dir: None,
            agent: AgentConfig::default(),
            block_driver: BlockDriver::default(),
            pmem: None,
            rng: true,
            timeouts: Timeouts::default(),
            die_with_parent: false,
            netns: None,
            tcg_tb_size_mib: default_tb_size(),
            balloon: true,
            seccomp_sandbox: true,
        }
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.agent
            .socket
            .clone()
            .unwrap_or_else(|| self.run_dir.join("agent.sock"))
    }
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.run_dir.join("qemu.pid")
    }
    pub fn stderr_log(&self) -> PathBuf {
        self.run_dir.join("qemu.stderr")
    }
    pub fn scsi_controller(&self) -> bool {
        self.block_driver == BlockDriver::VirtioScsi
    }

    /// Checks the values QEMU would otherwise reject late.
    pub fn validate(&self) -> Result<(), String> {
        if self.vcpus == 0 {
            return Err("vcpus must be at least 1".into());
        }
        if self.memory_mb < 64 {
            return Err(format!("memory_mb {} is below 64", self.memory_mb));
        }
        if self.machine == MachineType::Q35 && self.pcie_root_ports > crate::layout::MAX_ROOT_PORTS
        {
            return Err(format!(
                "pcie_root_ports {} above the {} the layout has room for",
                self.pcie_root_ports,
                crate::layout::MAX_ROOT_PORTS
            ));
        }
        if let Some(p) = &self.pmem {
            if p.slots == 0 {
                return Err("pmem.slots must be at least 1".into());
            }
            if p.maxmem_mb < self.memory_mb {
                return Err(format!(
                    "pmem.maxmem_mb {} below memory_mb {}",
                    p.maxmem_mb, self.memory_mb
                ));
            }
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return Err("initrd without kernel".into());
        }
        for (what, p) in [("run_dir", &self.run_dir)] {
            if p.as_os_str().is_empty() {
                return Err(format!("{what} is empty"));
            }
        }
        // sun_path is 108 bytes including the NUL.
        for sock in [self.qmp_socket(), self.agent_socket()] {
            if sock.as_os_str().len() > 107 {
                return Err(format!(
                    "socket path {} longer than 107 bytes",
                    sock.display()
                ));
            }
        }
        Ok(())
    }
}

/// Resolves a binary name through `PATH` (paths with a `/` are kept).
pub fn resolve_binary(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 || bin.is_absolute() {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_deserializes_with_defaults() {
        let cfg: VmConfig = serde_json::from_str(r#"{"run_dir": "/run/capsule/vm1"}"#).unwrap();
        assert_eq!(cfg.machine, MachineType::Pc);
        assert_eq!(cfg.accel, AccelMode::Auto);
        assert!(cfg.shared_memory);
        assert_eq!(cfg.qmp_socket(), PathBuf::from("/run/capsule/vm1/qmp.sock"));
        assert_eq!(cfg.timeouts, Timeouts::default());
        cfg.validate().unwrap();
    }

    #[test]
    fn full_config_deserializes() {
        let cfg: VmConfig = serde_json::from_str(
            r#"{"run_dir": "/r", "qemu_binary": "/opt/qemu", "machine": "q35", "pcie_root_ports": 4,
                "vcpus": 2, "memory_mb": 512, "shared_memory": false, "kernel": "/k", "initrd": "/i",
                "cmdline": "console=ttyS0", "accel": "tcg", "block_driver": "virtio-blk",
                "pmem": {"slots": 2, "maxmem_mb": 2048}, "agent": {"vsock": "off"},
                "timeouts": {"unplug_ms": 100}}"#,
        )
        .unwrap();
        assert_eq!(cfg.machine, MachineType::Q35);
        assert_eq!(cfg.timeouts.unplug_ms, 100);
        assert_eq!(cfg.timeouts.qmp_command_ms, 10_000);
        assert!(!cfg.scsi_controller());
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(serde_json::from_str::<VmConfig>(r#"{"run_dir": "/r", "bogus": 1}"#).is_err());
        let mut cfg = VmConfig::new("/r");
        cfg.vcpus = 0;
        assert!(cfg.validate().is_err());
        let mut cfg = VmConfig::new("/r");
        cfg.machine = MachineType::Q35;
        cfg.pcie_root_ports = 100;
        assert!(cfg.validate().unwrap_err().contains("pcie_root_ports"));
        let cfg = VmConfig::new(format!("/{}", "x".repeat(120)));
        assert!(cfg.validate().unwrap_err().contains("107"));
    }
}
