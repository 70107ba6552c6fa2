//! The real sandbox: virtiofsd + a QEMU VM (hypervisor crate) + the device
//! manager (devmgr) + the guest agent (agent-protocol's `AgentConn`).
//!
//! Start order, each step recorded in `vm.json` before the next, so that a
//! shim killed at any point leaves enough for `delete` to find and remove
//! everything: state lock → share mount point → virtiofsd (pid + start time
//! recorded right after the spawn) → device manager with the share
//! cold-plugged → QEMU (description recorded) → agent ready → CreateSandbox.
//! A failure at any step tears down what the steps before started.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use capsule_agent_protocol::agent;
use capsule_agent_protocol::client::{AgentConn, ConnOptions};
use capsule_devmgr::device::VhostUserKind;
use capsule_devmgr::{
    DeviceKind, DeviceManager, FileStore, HostDevice, ManagerConfig, Resolver, ResolverConfig,
};
use capsule_hypervisor::config::{AgentConfig, VmConfig, VsockMode};
use capsule_hypervisor::process::VmProcess;
use capsule_hypervisor::{QemuVm, RunningVm, VmSlot};
use oci_spec::runtime::Spec;

use super::devices::{attach_all, detach_all};
use super::{
    share, AttachedDevice, ContainerRequest, ExitStatus, GuestStats, Sandbox, SandboxFactory,
    SharedRootfs, GUEST_SHARED_DIR, SHARE_TAG,
};
use crate::cleanup::{self, KillTiming, RealProcesses};
use crate::config::{AgentTransport, Config};
use crate::error::{Error, Result};
use crate::state::{self, ManagerRecord, ProcRef, SandboxPaths, VmRecord};

mod faults;

/// Kernel parameters always passed (before `kernel_params`).
pub const BASE_KERNEL_PARAMS: &str = "console=ttyS0 panic=-1 quiet";

/// The VM configuration for a sandbox.
pub fn vm_config(config: &Config, paths: &SandboxPaths) -> Result<VmConfig> {
    let h = &config.hypervisor;
    let vsock = match config.agent.transport {
        AgentTransport::VirtioSerial | AgentTransport::Auto => VsockMode::Off,
        AgentTransport::Vsock => {
            return Err(Error::invalid(
                "capsule: [agent] transport = \"vsock\" is not supported by this build (the host agent client speaks virtio-serial); use \"virtio-serial\" or \"auto\"",
            ))
        }
    };
    let t = &config.timeouts;
    let mut vm = VmConfig::new(paths.run_dir());
    vm.qemu_binary = h.path.clone();
    vm.machine = h.machine;
    vm.vcpus = h.vcpus;
    vm.memory_mb = h.memory_mib;
    vm.shared_memory = true;
    vm.kernel = Some(h.kernel.clone());
    vm.initrd = Some(h.initramfs.clone());
    vm.cmdline = format!("{BASE_KERNEL_PARAMS} {}", h.kernel_params)
        .trim()
        .to_string();
    vm.accel = h.accel;
    vm.accel_cache_dir = Some(config.state_dir.join("cache"));
    vm.agent = AgentConfig {
        vsock,
        ..AgentConfig::default()
    };
    vm.block_driver = config.block_device_driver;
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    vm.timeouts.qmp_command_ms = ms(t.qmp().max(t.hotplug()));
    vm.timeouts.startup_ms = ms(t.qmp().max(Duration::from_secs(10)));
    vm.timeouts.unplug_ms = ms(t.unplug());
    vm.timeouts.vhost_probe_ms = ms(t.qmp().min(Duration::from_secs(5)));
    vm.die_with_parent = false;
    vm.validate()
        .map_err(|e| Error::invalid(format!("capsule: VM configuration: {e}")))?;
    Ok(vm)
}

pub fn resolver(config: &Config) -> Result<Resolver> {
    Resolver::new(ResolverConfig {
        vhost_user_store: config
            .enable_vhost_user_store
            .then(|| config.vhost_user_store_path.clone()),
        ..ResolverConfig::default()
    })
    .map_err(Error::from)
}

/// Starts QEMU sandboxes.
#[derive(Debug, Default, Clone, Copy)]
pub struct QemuFactory;

#[async_trait]
impl SandboxFactory for QemuFactory {
    fn check_devices(&self, config: &Config, spec: &Spec) -> Result<()> {
        let resolver = resolver(config)?;
        let infos = capsule_devmgr::oci::spec_devices(spec).map_err(user_error)?;
        for info in &infos {
            resolver.resolve(info).map_err(user_error)?;
        }
        Ok(())
    }

    async fn create(
        &self,
        id: &str,
        config: &Config,
        hostname: &str,
        shim_address: &str,
    ) -> Result<Arc<dyn Sandbox>> {
        let paths = SandboxPaths::new(&config.state_dir, id);
        match start(id, config, &paths, hostname, shim_address).await {
            Ok(sb) => Ok(Arc::new(sb)),
            Err(e) => {
                let report =
                    cleanup::teardown(&paths, &[], &RealProcesses, KillTiming::default()).await;
                if report.is_clean() {
                    Err(e)
                } else {
                    Err(e.note(format!(
                        "cleaning up the failed sandbox: {}",
                        report.errors.join("; ")
                    )))
                }
            }
        }
    }
}

fn user_error(e: impl Into<Error>) -> Error {
    let e: Error = e.into();
    let m = format!("capsule: {}", e.message);
    Error::new(e.kind, m)
}

fn console_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().rev().take(8).collect();
    if lines.is_empty() {
        return "(the guest console is empty)".into();
    }
    format!(
        "last guest console lines: {}",
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    )
}

struct Recorder {
    path: PathBuf,
    record: Mutex<VmRecord>,
}

impl Recorder {
    fn update(&self, f: impl FnOnce(&mut VmRecord)) -> Result<()> {
        let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut r);
        state::save(&self.path, &*r)
    }
}

async fn start(
    id: &str,
    config: &Config,
    paths: &SandboxPaths,
    hostname: &str,
    shim_address: &str,
) -> Result<QemuSandbox> {
    let vm_config = vm_config(config, paths)?;
    for d in [&paths.dir, &paths.shared_dir(), &paths.run_dir()] {
        std::fs::create_dir_all(d)
            .map_err(|e| crate::error::io(format!("creating {}", d.display()), e))?;
    }
    // The state lock, held for the shim's whole life.
    let store = FileStore::open(&paths.dir)
        .map_err(|e| Error::internal(format!("capsule: sandbox {id}: {e}")))?;
    let layout = capsule_hypervisor::launch::layout_of(&vm_config);
    let mgr_config = ManagerConfig::new(config.block_device_driver, layout.device_slot_range());
    let recorder = Recorder {
        path: paths.vm_file(),
        record: Mutex::new(VmRecord {
            version: state::STATE_VERSION,
            sandbox_id: id.to_string(),
            shim: ProcRef::current(),
            shim_address: Some(shim_address.to_string()),
            shared_dir: paths.shared_dir(),
            shared_mounted: false,
            virtiofsd: None,
            virtiofsd_socket: paths.virtiofsd_socket(),
            run_dir: paths.run_dir(),
            qemu_pidfile: vm_config.pidfile(),
            qemu: None,
            manager: ManagerRecord::of(&mgr_config),
        }),
    };
    recorder.update(|_| {})?;

    crate::mount::make_shared_mountpoint(&paths.shared_dir())?;
    recorder.update(|r| r.shared_mounted = true)?;

    let virtiofsd = super::virtiofsd::spawn(
        &config.virtiofsd.path,
        &paths.virtiofsd_socket(),
        &paths.shared_dir(),
        config.virtiofsd.sandbox,
        &paths.virtiofsd_log(),
        |p: &VmProcess| {
            recorder.update(|r| {
                r.virtiofsd = Some(ProcRef {
                    pid: p.pid(),
                    start_time: p.start_time(),
                })
            })
        },
    )
    .await
    .map_err(|e| e.context("capsule: starting virtiofsd"))?;

    let backend = Arc::new(VmSlot::new(vm_config.clone())?);
    let mgr = DeviceManager::new(mgr_config, crate::fault::wrap(backend.clone()), store)?;
    let share = mgr.new_device(HostDevice {
        info: None,
        host_path: paths.shared_dir(),
        kind: DeviceKind::VhostUser {
            vhost: VhostUserKind::Fs,
            socket: paths.virtiofsd_socket(),
            tag: SHARE_TAG.into(),
        },
    })?;
    mgr.coldplug(&share)
        .await
        .map_err(|e| Error::from(e).context("capsule: adding the virtio-fs share"))?;

    let vm = backend
        .start()
        .await
        .map_err(|e| Error::from(e).context("capsule: starting the VM"))?;
    recorder.update(|r| r.qemu = Some(vm.description().clone()))?;
    crate::fault::point("boot.vm-started");

    // From here on, QEMU or virtiofsd exiting fails Create at once.
    let exits = faults::Exits {
        qemu: (vm.pid(), vm.exit_watch()),
        virtiofsd: (virtiofsd.pid(), virtiofsd.exit_watch()),
    };
    let console = vm.description().console_log.clone();
    let t = &config.timeouts;
    let opts = ConnOptions {
        connect_timeout: t.agent_connect(),
        call_timeout: t.agent_call(),
    };
    let ready = async {
        AgentConn::wait_ready(&vm.description().agent_socket, opts, t.agent_connect())
            .await
            .map_err(|e| {
                Error::from(e)
                    .context("capsule: the guest agent did not come up")
                    .note(console_tail(&console))
            })
    };
    let agent = exits
        .race("waiting for the guest agent", &console, ready)
        .await?;
    let mut req = agent::CreateSandboxRequest::new();
    req.sandbox_id = id.to_string();
    req.hostname = hostname.to_string();
    req.storages.push(agent::Storage {
        driver: "virtiofs".into(),
        source: SHARE_TAG.into(),
        fstype: "virtiofs".into(),
        mount_point: GUEST_SHARED_DIR.into(),
        ..Default::default()
    });
    let setup = async {
        agent
            .create_sandbox(&req)
            .await
            .map_err(|e| Error::from(e).context("capsule: setting up the sandbox in the guest"))
    };
    exits
        .race("setting up the sandbox in the guest", &console, setup)
        .await?;

    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(faults::watch(
        id.to_string(),
        vm.clone(),
        exits,
        stopping.clone(),
    ));
    tracing::info!(sandbox = %id, pid = vm.pid(), "sandbox ready");
    Ok(QemuSandbox {
        id: id.to_string(),
        paths: paths.clone(),
        mgr,
        backend,
        resolver: resolver(config)?,
        vm,
        agent,
        virtiofsd,
        create_timeout: t.agent_call().max(t.device_wait() + Duration::from_secs(5)),
        device_wait: t.device_wait(),
        stopping,
        rootfs_mounted: Mutex::new(std::collections::HashMap::new()),
    })
}

pub struct QemuSandbox {
    id: String,
    paths: SandboxPaths,
    mgr: DeviceManager,
    #[allow(dead_code)] // keeps the VM backend alive with the manager
    backend: Arc<VmSlot>,
    resolver: Resolver,
    vm: QemuVm,
    agent: AgentConn,
    virtiofsd: VmProcess,
    create_timeout: Duration,
    /// `timeouts.device_wait`, sent to the agent with each CreateContainer.
    device_wait: Duration,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    rootfs_mounted: Mutex<std::collections::HashMap<String, bool>>,
}

fn process_req(cid: &str, exec_id: &str) -> agent::ProcessRequest {
    agent::ProcessRequest {
        container_id: cid.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    }
}

fn container_req(cid: &str) -> agent::ContainerRequest {
    agent::ContainerRequest {
        container_id: cid.into(),
        ..Default::default()
    }
}

#[async_trait]
impl Sandbox for QemuSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn pid(&self) -> u32 {
        self.vm.pid()
    }

    async fn prepare_rootfs(&self, c: &ContainerRequest) -> Result<SharedRootfs> {
        let shared = self.paths.shared_dir();
        let c2 = c.clone();
        let out = tokio::task::spawn_blocking(move || share::prepare(&shared, &c2))
            .await
            .map_err(|e| Error::internal(format!("rootfs task: {e}")))??;
        self.rootfs_mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(c.id.clone(), out.rootfs_mounted);
        Ok(out)
    }

    async fn release_rootfs(&self, cid: &str, bundle: &Path) -> Result<()> {
        let mounted = self
            .rootfs_mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(cid)
            .unwrap_or(true);
        let shared = self.paths.shared_dir();
        let (cid, bundle) = (cid.to_string(), bundle.to_path_buf());
        tokio::task::spawn_blocking(move || share::release(&shared, &cid, &bundle, mounted))
            .await
            .map_err(|e| Error::internal(format!("rootfs task: {e}")))?
    }

    async fn attach_devices(&self, _cid: &str, spec: &Spec) -> Result<Vec<AttachedDevice>> {
        attach_all(&self.mgr, &self.resolver, spec).await
    }

    async fn detach_devices(&self, _cid: &str, devices: &[AttachedDevice]) -> Result<()> {
        detach_all(&self.mgr, devices).await
    }

    async fn create_container(&self, mut req: agent::CreateContainerRequest) -> Result<()> {
        req.device_timeout_ms = u32::try_from(self.device_wait.as_millis()).unwrap_or(u32::MAX);
        self.agent
            .call(
                "CreateContainer",
                Some(self.create_timeout),
                |c, ctx| async move { c.create_container(ctx, &req).await },
            )
            .await?;
        Ok(())
    }

    async fn start_container(&self, cid: &str) -> Result<u32> {
        Ok(self.agent.start_container(&container_req(cid)).await?.pid)
    }

    async fn exec_process(
        &self,
        cid: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdin: bool,
    ) -> Result<u32> {
        let req = agent::ExecProcessRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            process,
            stdin,
            ..Default::default()
        };
        Ok(self.agent.exec_process(&req).await?.pid)
    }

    async fn signal_process(&self, cid: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let req = agent::SignalProcessRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.agent.signal_process(&req).await?;
        Ok(())
    }

    async fn wait_process(&self, cid: &str, exec_id: &str) -> Result<ExitStatus> {
        let r = self.agent.wait_process(&process_req(cid, exec_id)).await?;
        Ok(ExitStatus {
            status: u32::try_from(r.status).unwrap_or(255),
            exited_at_secs: r.exited_at_secs,
            exited_at_nanos: r.exited_at_nanos,
        })
    }

    async fn read_output(
        &self,
        cid: &str,
        exec_id: &str,
        stderr: bool,
        len: u32,
    ) -> Result<Vec<u8>> {
        let req = agent::ReadStreamRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            len,
            ..Default::default()
        };
        let r = if stderr {
            self.agent.read_stderr(&req).await?
        } else {
            self.agent.read_stdout(&req).await?
        };
        Ok(r.data)
    }

    async fn write_stdin(&self, cid: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        let req = agent::WriteStreamRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            data: data.to_vec(),
            ..Default::default()
        };
        Ok(self.agent.write_stdin(&req).await?.len as usize)
    }

    async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<()> {
        self.agent.close_stdin(&process_req(cid, exec_id)).await?;
        Ok(())
    }

    async fn resize_pty(&self, cid: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let req = agent::TtyWinResizeRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            rows,
            cols,
            ..Default::default()
        };
        self.agent.tty_win_resize(&req).await?;
        Ok(())
    }

    async fn pause(&self, cid: &str) -> Result<()> {
        self.agent.pause_container(&container_req(cid)).await?;
        Ok(())
    }

    async fn resume(&self, cid: &str) -> Result<()> {
        self.agent.resume_container(&container_req(cid)).await?;
        Ok(())
    }

    async fn update(&self, cid: &str, resources: Vec<u8>) -> Result<()> {
        let req = agent::UpdateContainerRequest {
            container_id: cid.into(),
            resources,
            ..Default::default()
        };
        self.agent.update_container(&req).await?;
        Ok(())
    }

    async fn stats(&self, cid: &str) -> Result<GuestStats> {
        let r = self.agent.stats_container(&container_req(cid)).await?;
        Ok(GuestStats {
            cgroup: r.cgroup.into_option().unwrap_or_default(),
            version: r.cgroup_version,
        })
    }

    async fn list_processes(&self, cid: &str) -> Result<Vec<(u32, String)>> {
        let r = self.agent.list_processes(&container_req(cid)).await?;
        Ok(r.processes
            .into_iter()
            .map(|p| (p.pid, p.exec_id))
            .collect())
    }

    async fn remove_container(&self, cid: &str) -> Result<()> {
        let req = agent::RemoveContainerRequest {
            container_id: cid.into(),
            timeout: 10,
            ..Default::default()
        };
        self.agent
            .call(
                "RemoveContainer",
                Some(Duration::from_secs(30)),
                |c, ctx| async move { c.remove_container(ctx, &req).await },
            )
            .await?;
        Ok(())
    }

    async fn vm_devices(&self) -> Result<serde_json::Value> {
        let d = self.vm.devices().await?;
        serde_json::to_value(d).map_err(|e| Error::internal(e.to_string()))
    }

    async fn shutdown(&self) -> Result<()> {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut errors = Vec::new();
        if let Err(e) = RunningVm::stop(&self.vm).await {
            errors.push(format!("stopping the VM: {e}"));
        }
        // virtiofsd exits when QEMU's connection goes; make sure.
        if !self
            .virtiofsd
            .terminate(Duration::from_secs(3), Duration::from_secs(3))
            .await
        {
            errors.push(format!(
                "virtiofsd (pid {}) did not exit",
                self.virtiofsd.pid()
            ));
        }
        let report =
            cleanup::teardown(&self.paths, &[], &RealProcesses, KillTiming::default()).await;
        errors.extend(report.errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::internal(format!(
                "sandbox {}: {}",
                self.id,
                errors.join("; ")
            )))
        }
    }
}
