//! Starting QEMU: a [`VmBuilder`] collects the cold-plugged devices (it is
//! the [`DeviceBackend`] of a VM that has not booted), then
//! [`VmBuilder::start`] picks the accelerator, builds the command line,
//! spawns QEMU, hands the [`VmDescription`] to the caller's recorder (the
//! one place it is persisted) and negotiates QMP.
use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use capsule_device_api::GuestAddress;
use capsule_device_api::{
    AttachRequest, BackendError, BackendErrorKind, DeviceBackend, UnplugOutcome,
};

use crate::accel::choose_accel;
use crate::config::{resolve_binary, MachineType, VmConfig, VsockMode};
use crate::description::{VmDescription, DESCRIPTION_VERSION};
use crate::error::HypervisorError;
use crate::hotplug::{self, exec::vet_backend, AddressPlan, DevicePlan};
use crate::layout::VmLayout;
use crate::pci_path::find_pci_path;
use crate::process::{SpawnOptions, VmProcess};
use crate::qmp::{QmpClient, QmpOptions};
use crate::tap_fds::TapFds;
use crate::vm::QemuVm;

pub mod argv;

use argv::{build_argv, ArgvInput, ColdDevice};

struct Cold {
    req: AttachRequest,
    plan: DevicePlan,
    /// Vetted vhost-user connection QEMU inherits.
    fd: Option<OwnedFd>,
    /// Tap queues QEMU inherits (network endpoints).
    tap_fds: Vec<OwnedFd>,
}

#[derive(Default)]
struct State {
    cold: Vec<Cold>,
    used_slots: BTreeSet<u32>,
    pmem_count: u32,
}

/// Persists a VM's description the moment QEMU runs, before anything else
/// can fail: a runtime that dies from there on leaves a VM its successor
/// can find and stop. An error kills QEMU and fails the start.
pub type DescriptionRecorder = Box<dyn FnOnce(&VmDescription) -> Result<(), String> + Send + Sync>;

/// A VM being configured. Implements [`DeviceBackend::coldplug`].
pub struct VmBuilder {
    config: VmConfig,
    layout: VmLayout,
    state: Mutex<State>,
    recorder: Option<DescriptionRecorder>,
    taps: Arc<TapFds>,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("run_dir", &self.config.run_dir)
            .finish()
    }
}

/// The layout a config produces.
pub fn layout_of(config: &VmConfig) -> VmLayout {
    VmLayout {
        machine: config.machine,
        root_ports: if config.machine == MachineType::Q35 {
            config.pcie_root_ports
        } else {
            0
        },
        shared_memory: config.shared_memory,
        scsi_controller: config.scsi_controller(),
        nvdimm: config.pmem.is_some(),
    }
}

impl VmBuilder {
    pub fn new(config: VmConfig) -> Result<Self, HypervisorError> {
        config.validate().map_err(HypervisorError::Config)?;
        let layout = layout_of(&config);
        Ok(Self {
            config,
            layout,
            state: Mutex::new(State::default()),
            recorder: None,
            taps: Arc::default(),
        })
    }

    /// Where network endpoints' tap queues are handed over (shared with
    /// the VM once it runs).
    pub fn taps(&self) -> Arc<TapFds> {
        self.taps.clone()
    }

    /// Hands the description of the started VM to `recorder` (see
    /// [`DescriptionRecorder`]). Without one, nothing is persisted.
    pub fn record_with(mut self, recorder: DescriptionRecorder) -> Self {
        self.recorder = Some(recorder);
        self
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn layout(&self) -> VmLayout {
        self.layout
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts QEMU with the cold-plugged devices.
    pub async fn start(self) -> Result<QemuVm, HypervisorError> {
        let state = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        start(
            self.config,
            self.layout,
            state.cold,
            self.recorder,
            self.taps,
        )
        .await
    }
}

#[async_trait]
impl DeviceBackend for VmBuilder {
    async fn hotplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!(
                "device {}: the VM has not started; cold-plug it instead",
                req.id
            ),
        ))
    }

    async fn unplug(&self, req: &AttachRequest) -> Result<UnplugOutcome, BackendError> {
        // Not started: forgetting the cold-plug entry is the unplug.
        let mut st = self.lock();
        if let Some(pos) = st.cold.iter().position(|c| c.req.id == req.id) {
            let c = st.cold.remove(pos);
            for s in &c.req.pci_slots {
                st.used_slots.remove(s);
            }
        }
        Ok(UnplugOutcome::Removed)
    }

    async fn coldplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        let req = req.clone();
        {
            let st = self.lock();
            if st.cold.iter().any(|c| c.req.id == req.id) {
                return Err(hotplug::failed(format!(
                    "device {} is already cold-plugged",
                    req.id
                )));
            }
            if let Some(s) = req.pci_slots.iter().find(|s| st.used_slots.contains(s)) {
                return Err(hotplug::failed(format!(
                    "device {}: PCI slot {s} is already taken",
                    req.id
                )));
            }
        }
        let plan = hotplug::plan(&req, &self.layout)?;
        let fd = vet_backend(&plan, self.config.timeouts.vhost_probe()).await?;
        let tap_fds = match plan.steps.iter().find_map(|s| match s {
            hotplug::Step::TapNetdev { tap, queues, .. } => Some((tap, *queues)),
            _ => None,
        }) {
            Some((tap, queues)) => self
                .taps
                .take(tap, queues)
                .map_err(|m| hotplug::failed(format!("device {}: {m}", req.id)))?,
            None => Vec::new(),
        };
        let mut st = self.lock();
        let address = match &plan.address {
            AddressPlan::None => GuestAddress::None,
            AddressPlan::Scsi(a) => GuestAddress::Scsi(*a),
            AddressPlan::Pci { predicted, .. } => GuestAddress::Pci(
                predicted
                    .clone()
                    .ok_or_else(|| hotplug::failed(format!("device {}: no PCI slot", req.id)))?,
            ),
            AddressPlan::Vfio { predicted, .. } => GuestAddress::Vfio(
                predicted
                    .iter()
                    .cloned()
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| hotplug::failed(format!("device {}: no PCI slot", req.id)))?,
            ),
            AddressPlan::Pmem { index, .. } => GuestAddress::Pmem(index.unwrap_or(st.pmem_count)),
        };
        if matches!(plan.address, AddressPlan::Pmem { .. }) {
            st.pmem_count += 1;
        }
        if let Some(s) = req.pci_slots.iter().find(|s| st.used_slots.contains(s)) {
            return Err(hotplug::failed(format!(
                "device {}: PCI slot {s} is already taken",
                req.id
            )));
        }
        st.used_slots.extend(req.pci_slots.iter().copied());
        tracing::info!(device = %req.id, kind = plan.kind, address = ?address, "cold-plugged");
        st.cold.push(Cold {
            req,
            plan,
            fd,
            tap_fds,
        });
        Ok(address)
    }
}

fn tail(path: &Path, max: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let s = s.trim();
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

/// Refuses to start a second VM in a run directory whose VM still runs (the
/// pid in its pidfile is a live process whose command line names the run
/// directory): the caller should stop or attach to it instead of leaking it.
fn refuse_if_running(config: &VmConfig) -> Result<(), HypervisorError> {
    let path = config.pidfile();
    let Some(pid) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return Ok(());
    };
    let needle = config.run_dir.to_string_lossy().into_owned();
    let names_run_dir = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle.as_str()))
        .unwrap_or(false);
    let alive = crate::process::proc_start_time(pid).is_ok();
    if alive && names_run_dir {
        return Err(HypervisorError::AlreadyRunning { pid, pidfile: path });
    }
    tracing::info!(pid, path = %path.display(), "replacing the pidfile of a VM that is gone");
    Ok(())
}

/// Removes a stale unix socket left by an earlier QEMU (only sockets).
fn remove_stale_socket(path: &Path) -> Result<(), HypervisorError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| HypervisorError::io(format!("removing {}", path.display()), e)),
        Ok(_) => Err(HypervisorError::Config(format!(
            "{} exists and is not a socket",
            path.display()
        ))),
        Err(_) => Ok(()),
    }
}

async fn start(
    config: VmConfig,
    layout: VmLayout,
    cold: Vec<Cold>,
    recorder: Option<DescriptionRecorder>,
    taps: Arc<TapFds>,
) -> Result<QemuVm, HypervisorError> {
    let t0 = Instant::now();
    let run_dir = &config.run_dir;
    std::fs::create_dir_all(run_dir)
        .map_err(|e| HypervisorError::io(format!("creating {}", run_dir.display()), e))?;
    refuse_if_running(&config)?;
    for sock in [config.qmp_socket(), config.agent_socket()] {
        remove_stale_socket(&sock)?;
    }
    let qemu = resolve_binary(&config.qemu_binary).ok_or_else(|| {
        HypervisorError::Config(format!(
            "QEMU binary {} not found (install qemu-system-x86, or set qemu_binary)",
            config.qemu_binary.display()
        ))
    })?;
    for (what, p) in [("kernel", &config.kernel), ("initrd", &config.initrd)] {
        if let Some(p) = p {
            if !p.is_file() {
                return Err(HypervisorError::Config(format!(
                    "{what} {} does not exist",
                    p.display()
                )));
            }
        }
    }
    let accel = choose_accel(&config, &qemu).await;
    let vsock = match config.agent.vsock {
        VsockMode::On => true,
        VsockMode::Off => false,
        VsockMode::Auto => config.agent.vhost_vsock_device.exists(),
    };
    let cold_devices: Vec<ColdDevice> = cold
        .iter()
        .map(|c| ColdDevice {
            plan: c.plan.clone(),
            chardev_fd: c.fd.as_ref().map(AsRawFd::as_raw_fd),
            tap_fds: c.tap_fds.iter().map(AsRawFd::as_raw_fd).collect(),
        })
        .collect();
    let args = build_argv(&ArgvInput {
        config: &config,
        accel: accel.accel,
        vsock,
        coldplug: &cold_devices,
    })
    .map_err(HypervisorError::Config)?;
    let stderr_log = config.stderr_log();
    let _ = std::fs::remove_file(&stderr_log);
    let _ = std::fs::remove_file(config.console_log());
    let netns = match &config.netns {
        Some(p) => Some(std::fs::File::open(p).map_err(|e| {
            HypervisorError::io(format!("opening network namespace {}", p.display()), e)
        })?),
        None => None,
    };
    tracing::info!(qemu = %qemu.display(), args = ?args, netns = ?config.netns, "starting QEMU");
    let process = VmProcess::spawn(
        &qemu,
        &args,
        SpawnOptions {
            log: Some(&stderr_log),
            inherit_fds: cold_devices
                .iter()
                .flat_map(|c| c.chardev_fd.into_iter().chain(c.tap_fds.iter().copied()))
                .collect(),
            die_with_parent: config.die_with_parent,
            netns: netns.as_ref().map(AsRawFd::as_raw_fd),
            keep_capabilities: Some(crate::process::QEMU_CAPABILITIES),
        },
    )
    .map_err(|e| HypervisorError::Start {
        reason: format!("cannot run {}: {e}", qemu.display()),
        stderr: String::new(),
    })?;
    // QEMU has its copies of the vetted backend connections now.
    let coldplugged: Vec<AttachRequest> = cold.into_iter().map(|c| c.req).collect();
    let desc = VmDescription {
        version: DESCRIPTION_VERSION,
        pid: process.pid(),
        start_time: process.start_time(),
        qemu_binary: qemu.clone(),
        run_dir: config.run_dir.clone(),
        qmp_socket: config.qmp_socket(),
        agent_socket: config.agent_socket(),
        console_log: config.console_log(),
        pidfile: config.pidfile(),
        accel: accel.accel,
        machine: layout.machine,
        root_ports: layout.root_ports,
        shared_memory: layout.shared_memory,
        scsi_controller: layout.scsi_controller,
        nvdimm: layout.nvdimm,
        memory_mb: config.memory_mb,
        vsock_cid: vsock.then_some(config.agent.guest_cid),
        coldplugged,
        timeouts: config.timeouts,
    };
    // Persisted before anything else can fail: a runtime that dies from
    // here on leaves a VM its successor can find (and stop), not a leak.
    if let Some(record) = recorder {
        if let Err(reason) = record(&desc) {
            tracing::error!(pid = process.pid(), %reason, "cannot persist the VM description; killing QEMU");
            process.kill(Duration::from_secs(5)).await;
            return Err(HypervisorError::Start {
                reason: format!("recording the started VM: {reason}"),
                stderr: String::new(),
            });
        }
    }

    let qmp = match connect_qmp(&config, &process).await {
        Ok(q) => q,
        Err(reason) => {
            // Never leave a QEMU behind (or a zombie): kill and reap it.
            tracing::error!(pid = process.pid(), %reason, "QEMU did not come up; killing it");
            process.kill(Duration::from_secs(5)).await;
            return Err(HypervisorError::Start {
                reason,
                stderr: tail(&stderr_log, 2000),
            });
        }
    };

    let vm = QemuVm::from_parts(desc, process, qmp.clone(), taps);
    if let Err(e) = check_coldplug_paths(&qmp, &cold_devices).await {
        tracing::warn!(error = %e, "cannot check cold-plugged PCI paths");
    }
    tracing::info!(pid = vm.pid(), accel = %accel.accel, took = ?t0.elapsed(), "VM started");
    Ok(vm)
}

/// Waits for QMP: connect + negotiate, until the startup deadline or QEMU's
/// exit, whichever comes first.
async fn connect_qmp(config: &VmConfig, process: &VmProcess) -> Result<QmpClient, String> {
    let deadline = Instant::now() + config.timeouts.startup();
    let opts = QmpOptions {
        command_timeout: config.timeouts.qmp_command(),
        handshake_timeout: config.timeouts.qmp_command().min(Duration::from_secs(5)),
    };
    let sock: PathBuf = config.qmp_socket();
    let mut last_err = String::from("QMP socket never appeared");
    loop {
        if let Some(info) = process.exit_info() {
            return Err(format!("QEMU exited during startup ({info})"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no QMP within {:?}: {last_err}",
                config.timeouts.startup()
            ));
        }
        if sock.exists() {
            match QmpClient::connect(&sock, opts).await {
                Ok(c) => return Ok(c),
                Err(e) => last_err = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn check_coldplug_paths(qmp: &QmpClient, cold: &[ColdDevice]) -> Result<(), HypervisorError> {
    if !cold.iter().any(|c| {
        matches!(
            c.plan.address,
            AddressPlan::Pci { .. } | AddressPlan::Vfio { .. }
        )
    }) {
        return Ok(());
    }
    let buses = qmp.query_pci().await?;
    for c in cold {
        let pairs: Vec<(&String, Option<&capsule_device_api::PciPath>)> = match &c.plan.address {
            AddressPlan::Pci { device, predicted } => vec![(device, predicted.as_ref())],
            AddressPlan::Vfio { devices, predicted } => devices
                .iter()
                .zip(predicted.iter().map(Option::as_ref))
                .collect(),
            _ => vec![],
        };
        for (dev, predicted) in pairs {
            let actual = find_pci_path(&buses, dev);
            if actual.as_ref() != predicted {
                tracing::error!(device = %dev, ?predicted, ?actual, "cold-plugged device is not where the layout put it");
            }
        }
    }
    Ok(())
}
