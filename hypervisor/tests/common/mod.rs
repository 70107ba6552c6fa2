//! Test harness: guest image, VMs in temp dirs, the guest shell over
//! `agent.channel.0`, leak snapshots; loop devices, daemons and binary
//! checks come from `capsule_hypervisor::testkit`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use capsule_device_api::AttachRequest;
use capsule_device_api::{BlockDriver, DeviceKind};
use capsule_hypervisor::config::{AccelMode, MachineType, PmemConfig, VmConfig};
use capsule_hypervisor::devices::sorted_names;
use capsule_hypervisor::{QemuVm, VmBuilder};

// Host resources shared with other crates' real-QEMU tests.
#[allow(unused_imports)]
pub use capsule_hypervisor::testkit::{pattern, require_binary, require_qemu, Daemon, LoopDev};

pub const READY_MARKER: &str = "CAPSULE-TEST-INIT READY";

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("capsule_hypervisor=info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Kernel and test initramfs. Builds them with guest/build.sh when missing;
/// fails with what to do when that is not possible.
pub fn guest_images() -> (PathBuf, PathBuf) {
    static BUILD: Once = Once::new();
    let dir = std::env::var_os("CAPSULE_GUEST_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest"));
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs-test.img");
    if !(kernel.is_file() && initrd.is_file()) {
        BUILD.call_once(|| {
            let script = workspace_root().join("guest/build.sh");
            if script.is_file() {
                eprintln!("guest image missing; running {}", script.display());
                let _ = Command::new(&script).status();
            }
        });
    }
    assert!(
        kernel.is_file() && initrd.is_file(),
        "guest image missing: {} and {} are needed. Build them with `make guest` (guest/build.sh).",
        kernel.display(),
        initrd.display()
    );
    (kernel, initrd)
}

/// How to boot a test VM.
#[derive(Clone)]
pub struct VmOpts {
    pub machine: MachineType,
    pub guest: bool,
    pub shared_memory: bool,
    pub pmem: bool,
    pub block_driver: BlockDriver,
    pub unplug_ms: u64,
    pub qmp_ms: u64,
}

impl Default for VmOpts {
    fn default() -> Self {
        Self {
            machine: MachineType::Pc,
            guest: true,
            shared_memory: true,
            pmem: false,
            block_driver: BlockDriver::VirtioScsi,
            unplug_ms: 8_000,
            qmp_ms: 10_000,
        }
    }
}

/// A VM in its own temp dir. Stopped on `shutdown` (or killed on drop).
pub struct TestVm {
    pub vm: QemuVm,
    pub dir: tempfile::TempDir,
    pub config: VmConfig,
}

pub fn test_config(dir: &Path, opts: &VmOpts) -> VmConfig {
    let mut cfg = VmConfig::new(dir.join("run"));
    cfg.qemu_binary = require_qemu();
    cfg.machine = opts.machine;
    cfg.pcie_root_ports = 4;
    cfg.accel = AccelMode::Tcg;
    cfg.memory_mb = 256;
    cfg.shared_memory = opts.shared_memory;
    cfg.block_driver = opts.block_driver;
    cfg.die_with_parent = true;
    cfg.timeouts.unplug_ms = opts.unplug_ms;
    cfg.timeouts.qmp_command_ms = opts.qmp_ms;
    cfg.timeouts.startup_ms = 20_000;
    if opts.pmem {
        cfg.pmem = Some(PmemConfig {
            slots: 4,
            maxmem_mb: 2048,
        });
    }
    if opts.guest {
        let (kernel, initrd) = guest_images();
        cfg.kernel = Some(kernel);
        cfg.initrd = Some(initrd);
        cfg.cmdline = "console=ttyS0 panic=-1 quiet".into();
    }
    cfg
}

/// Where the test VMs' descriptions are saved.
pub fn description_path(config: &capsule_hypervisor::VmConfig) -> std::path::PathBuf {
    config.run_dir.join("vm.json")
}

impl TestVm {
    /// Boots a VM (with `cold` devices) and, with a guest, waits for READY.
    pub async fn boot_with(opts: VmOpts, cold: Vec<AttachRequest>) -> Result<Self> {
        init_tracing();
        let dir = tempfile::Builder::new().prefix("caphv").tempdir()?;
        let config = test_config(dir.path(), &opts);
        // Like a runtime, persist the description (where capsule-vmctl and
        // the reconnect tests find it).
        let desc_path = description_path(&config);
        let builder = VmBuilder::new(config.clone())?.record_with(Box::new(move |d| {
            d.save(&desc_path).map_err(|e| e.to_string())
        }));
        for req in &cold {
            use capsule_device_api::DeviceBackend;
            builder
                .coldplug(req)
                .await
                .map_err(|e| anyhow!("coldplug {}: {e}", req.id))?;
        }
        let vm = builder.start().await?;
        let t = TestVm { vm, dir, config };
        if opts.guest {
            t.wait_console(READY_MARKER, Duration::from_secs(90))
                .await?;
        }
        Ok(t)
    }

    pub async fn boot(opts: VmOpts) -> Result<Self> {
        Self::boot_with(opts, vec![]).await
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.config.console_log()).unwrap_or_default()
    }

    pub async fn wait_console(&self, marker: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(marker) {
                return Ok(());
            }
            if self.vm.process().has_exited() {
                bail!(
                    "QEMU exited before {marker:?}; console:\n{}",
                    self.console()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no {marker:?} within {timeout:?}; console:\n{}",
                    self.console()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn shell(&self) -> Result<GuestShell> {
        GuestShell::connect(&self.config.agent_socket()).await
    }

    pub async fn snapshot(&self) -> Result<Snapshot> {
        Snapshot::take(&self.vm).await
    }

    pub async fn shutdown(self) -> Result<()> {
        let pid = self.vm.pid();
        self.vm.stop().await?;
        assert!(self.vm.process().has_exited());
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "QEMU {pid} left as a zombie"
        );
        for f in [
            self.config.qmp_socket(),
            self.config.agent_socket(),
            self.config.pidfile(),
        ] {
            assert!(!f.exists(), "{} left behind", f.display());
        }
        Ok(())
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        // Test failed before shutdown: do not leave QEMU running.
        let _ = self.vm.process().signal(libc::SIGKILL);
    }
}

/// QEMU's view of leftovers, compared before and after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub chardevs: Vec<String>,
    pub block_nodes: Vec<String>,
    pub peripheral: Vec<String>,
    pub objects: Vec<String>,
    pub fds: usize,
}

impl Snapshot {
    pub async fn take(vm: &QemuVm) -> Result<Self> {
        let qmp = vm.qmp().await?;
        let chardevs = sorted_names(qmp.query_chardev().await?, |c| c.label);
        // Every node, auto-named ones included.
        let block_nodes = sorted_names(qmp.query_named_block_nodes().await?, |n| n.node_name);
        let peripheral = sorted_names(qmp.peripheral_devices().await?, |(id, _)| id);
        let objects = sorted_names(qmp.user_objects().await?, |(id, _)| id);
        Ok(Self {
            chardevs,
            block_nodes,
            peripheral,
            objects,
            fds: vm.process().fd_count()?,
        })
    }
}

pub use capsule_hypervisor::testkit::GuestShell;

/// A request as the device manager would build it.
pub fn request(id: &str, kind: DeviceKind, host_path: &Path) -> AttachRequest {
    AttachRequest {
        id: id.into(),
        kind,
        host_path: host_path.to_path_buf(),
        read_only: false,
        driver: None,
        block_index: None,
        drive_name: None,
        scsi_addr: None,
        pmem_index: None,
        pci_slots: vec![],
    }
}
