//! The real sandbox: virtiofsd + a QEMU VM (hypervisor crate) + the device
//! manager (devmgr, which owns every device and guest address) + the guest
//! agent (agent-protocol's `AgentConn`).
//!
//! Start order, each step recorded in `sandbox.json` before the next, so
//! that a shim killed at any point leaves enough for `delete` to find and
//! remove everything: device state lock → share mount point → virtiofsd
//! (pid + start time recorded right after the spawn) → device manager with
//! the share cold-plugged → QEMU (its description recorded the moment it
//! runs) → agent ready → CreateSandbox. A failure at any step tears down
//! what the steps before started.
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use capsule_agent_protocol::agent;
use capsule_agent_protocol::client::{AgentConn, ConnOptions};
use capsule_devmgr::device::VhostUserKind;
use capsule_devmgr::{
    ContainerDevice, DeviceKind, DeviceManager, FileStore, HostDevice, ManagerConfig,
    ResolvedDevices, Resolver, ResolverConfig,
};
use capsule_hypervisor::config::{AgentConfig, VmConfig, VsockMode};
use capsule_hypervisor::process::VmProcess;
use capsule_hypervisor::{QemuVm, VmBuilder, VmSlot};
use oci_spec::runtime::Spec;

use super::{
    network, share, ContainerRequest, ExitStatus, Guest, Sandbox, SandboxFactory, SandboxSetup,
    SharedRootfs, GUEST_SHARED_DIR, SHARE_TAG,
};
use crate::cleanup::{self, KillTiming, RealProcesses};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::state::{ManagerRecord, ProcRef, SandboxPaths, SandboxStore};

mod agent_guest;
mod faults;

use agent_guest::AgentGuest;

/// Kernel parameters always passed (before `kernel_params`). The TSC and
/// timer words skip calibration and checks a VM does not need (measured:
/// guest/kernel/measurements.md). Free page reporting in 2^5-page (128 KiB)
/// blocks instead of the balloon's 2 MiB: 4 MiB less guest RAM on the host
/// per idle sandbox (`make bench`, figure 3b); the agent applies it, as
/// Linux 6.1 overwrites it when the balloon registers
/// (agent/src/page_reporting.rs).
pub const BASE_KERNEL_PARAMS: &str = "console=ttyS0 panic=-1 quiet tsc=reliable no_timer_check noreplace-smp cryptomgr.notests page_reporting.page_reporting_order=5";

/// What the virtio-fs share is, as the device manager records its owner.
const SHARE_PURPOSE: &str = "virtio-fs share";

/// The VM configuration for a sandbox.
pub fn vm_config(config: &Config, paths: &SandboxPaths) -> Result<VmConfig> {
    let h = &config.hypervisor;
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
    vm.tcg_tb_size_mib = h.tcg_translation_cache_mib;
    vm.accel_cache_dir = Some(config.state_dir.join("cache"));
    // The host agent client speaks virtio-serial (the config refuses vsock).
    vm.agent = AgentConfig {
        vsock: VsockMode::Off,
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
        .map_err(|e| Error::invalid(format!("VM configuration: {e}")))?;
    Ok(vm)
}

pub fn resolver(config: &Config) -> Result<Resolver> {
    Ok(Resolver::new(ResolverConfig {
        vhost_user_store: config
            .enable_vhost_user_store
            .then(|| config.vhost_user_store_path.clone()),
        ..ResolverConfig::default()
    })?)
}

/// Starts QEMU sandboxes.
#[derive(Debug, Default, Clone, Copy)]
pub struct QemuFactory;

#[async_trait]
impl SandboxFactory for QemuFactory {
    fn resolve_devices(&self, config: &Config, spec: &Spec) -> Result<ResolvedDevices> {
        Ok(resolver(config)?.resolve_spec(spec)?)
    }

    async fn create(
        &self,
        id: &str,
        config: &Config,
        store: Arc<SandboxStore>,
        setup: &SandboxSetup,
    ) -> Result<Arc<dyn Sandbox>> {
        let paths = SandboxPaths::new(&config.state_dir, id);
        match start(id, config, &paths, store, setup).await {
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

/// Makes sockets QEMU and virtiofsd created private (0600): the process
/// umask already keeps every other state file 0600.
fn restrict_sockets(sockets: &[&Path]) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    for s in sockets {
        let meta = std::fs::symlink_metadata(s)
            .map_err(|e| crate::error::io(format!("checking {}", s.display()), e))?;
        if !meta.file_type().is_socket() {
            return Err(Error::internal(format!(
                "{} is not a socket; refusing to change it",
                s.display()
            )));
        }
        std::fs::set_permissions(s, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| crate::error::io(format!("making {} private", s.display()), e))?;
    }
    Ok(())
}

fn private_dir(d: &Path) -> Result<()> {
    capsule_state_file::create_private_dir(d)
        .map_err(|e| crate::error::io(format!("creating {}", d.display()), e))
}

async fn start(
    id: &str,
    config: &Config,
    paths: &SandboxPaths,
    store: Arc<SandboxStore>,
    setup: &SandboxSetup,
) -> Result<QemuSandbox> {
    let mut vm_config = vm_config(config, paths)?;
    for d in [
        &config.state_dir,
        &config.sandboxes_dir(),
        &paths.dir,
        &paths.shared_dir(),
        &paths.run_dir(),
    ] {
        private_dir(d)?;
    }
    // The device state lock, held for the shim's whole life.
    let device_store =
        FileStore::open(&paths.dir).map_err(|e| Error::internal(format!("sandbox {id}: {e}")))?;
    // The pod's network namespace: the spec's, or one of the sandbox's own
    // for a spec that asked for a new one. QEMU runs in it. What CNI put
    // there already is discovered now (a bad namespace fails here) and
    // cold-plugged; what comes later, before the sandbox's first Start.
    let (netns, netns_given) = match setup.network.clone() {
        network::PodNetwork::Netns(ns) => (ns, true),
        network::PodNetwork::Loopback => {
            let own = paths.netns_file();
            network::create_private_netns(&own)?;
            (own, false)
        }
    };
    let queues = config.hypervisor.vcpus.max(1);
    let net_plan = network::plan(&netns, queues).await?;
    vm_config.netns = Some(netns.clone());
    let layout = capsule_hypervisor::launch::layout_of(&vm_config);
    let mgr_config = ManagerConfig::new(config.block_device_driver, layout.device_slot_range());
    store.update(|r| r.manager = Some(ManagerRecord::of(&mgr_config)))?;

    crate::mount::make_shared_mountpoint(&paths.shared_dir())?;
    store.update(|r| r.shared_mounted = true)?;

    let virtiofsd = super::virtiofsd::spawn(
        &config.virtiofsd.path,
        &paths.virtiofsd_socket(),
        &paths.shared_dir(),
        config.virtiofsd.sandbox,
        &paths.virtiofsd_log(),
        |p: &VmProcess| {
            store.update(|r| {
                r.virtiofsd = Some(ProcRef {
                    pid: p.pid(),
                    start_time: p.start_time(),
                })
            })
        },
    )
    .await
    .map_err(|e| e.context("starting virtiofsd"))?;
    restrict_sockets(&[&paths.virtiofsd_socket()])?;

    let recorder = store.clone();
    let builder = VmBuilder::new(vm_config)?.record_with(Box::new(move |desc| {
        recorder
            .update(|r| r.qemu = Some(desc.clone()))
            .map_err(|e| e.to_string())
    }));
    let slot = Arc::new(VmSlot::from_builder(builder));
    let mgr = DeviceManager::new(mgr_config, crate::fault::wrap(slot.clone()), device_store)?
        .with_checkpoints(crate::fault::checkpoints());
    mgr.attach_runtime(
        SHARE_PURPOSE,
        HostDevice {
            info: None,
            host_path: paths.shared_dir(),
            kind: DeviceKind::VhostUser {
                vhost: VhostUserKind::Fs,
                socket: paths.virtiofsd_socket(),
                tag: SHARE_TAG.into(),
            },
        },
        true,
    )
    .await
    .map_err(|e| {
        let e = Error::from(e);
        match super::virtiofsd::exit_note(&virtiofsd, &paths.virtiofsd_log()) {
            Some(why) => e.context(why),
            None => e,
        }
        .context("adding the virtio-fs share")
    })?;
    network::attach(&mgr, &slot, &net_plan.endpoints, true).await?;

    let vm = slot
        .start()
        .await
        .map_err(|e| Error::from(e).context("starting the VM"))?;
    crate::fault::point("boot.vm-started");
    restrict_sockets(&[&vm.description().qmp_socket, &vm.description().agent_socket])?;

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
                    .context("the guest agent did not come up")
                    .note(console_tail(&console))
            })
    };
    tracing::info!(pid = vm.pid(), "QEMU is up; waiting for the guest agent");
    let agent = exits
        .race("waiting for the guest agent", &console, ready)
        .await?;
    let mut req = agent::CreateSandboxRequest::new();
    req.sandbox_id = id.to_string();
    req.hostname = setup.hostname.clone();
    req.pod_namespaces = setup.pod_namespaces;
    req.storages.push(agent::Storage {
        driver: "virtiofs".into(),
        source: SHARE_TAG.into(),
        fstype: "virtiofs".into(),
        mount_point: GUEST_SHARED_DIR.into(),
        ..Default::default()
    });
    let create = async {
        agent
            .create_sandbox(&req)
            .await
            .map_err(|e| Error::from(e).context("setting up the sandbox in the guest"))
    };
    let created = exits
        .race("setting up the sandbox in the guest", &console, create)
        .await?;
    let pod_pid = match (setup.pod_namespaces, created.pod_pid) {
        (false, _) => None,
        (true, 0) => {
            return Err(Error::internal(
                "the guest agent made no pod pause process (an agent older than this shim?)",
            ))
        }
        (true, pid) => Some(pid),
    };
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(faults::watch(
        id.to_string(),
        vm.clone(),
        exits,
        stopping.clone(),
    ));
    tracing::info!(sandbox = %id, pid = vm.pid(), ?pod_pid, "sandbox ready");
    Ok(QemuSandbox {
        id: id.to_string(),
        pod_pid,
        paths: paths.clone(),
        mgr,
        slot,
        vm,
        guest: AgentGuest {
            agent,
            create_timeout: t.agent_call().max(t.device_wait() + Duration::from_secs(5)),
            device_wait: t.device_wait(),
        },
        virtiofsd,
        stopping,
        rootfs_mounted: Mutex::new(std::collections::HashMap::new()),
        network: tokio::sync::Mutex::new(PodNet {
            netns,
            given: netns_given,
            queues,
            attached: net_plan.endpoints,
            configured: false,
        }),
        setup_timeout: t.agent_call().max(t.device_wait() + Duration::from_secs(5)),
        device_wait: t.device_wait(),
    })
}

/// The pod network of a running sandbox.
struct PodNet {
    netns: std::path::PathBuf,
    /// The spec named it (CRI, `--with-ns`): it must hold a link to give
    /// the VM. Otherwise it is the sandbox's own (loopback unless CNI ran).
    given: bool,
    queues: u32,
    /// Endpoints plugged into the VM.
    attached: Vec<capsule_devmgr::NetEndpoint>,
    /// The guest was configured.
    configured: bool,
}

pub struct QemuSandbox {
    id: String,
    /// The guest pid of the pod's pause process (no pause container).
    pod_pid: Option<u32>,
    paths: SandboxPaths,
    mgr: DeviceManager,
    /// The VM as the device manager's backend; stopped at shutdown so no
    /// device call reaches a VM that is going away.
    slot: Arc<VmSlot>,
    vm: QemuVm,
    guest: AgentGuest,
    virtiofsd: VmProcess,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    rootfs_mounted: Mutex<std::collections::HashMap<String, bool>>,
    network: tokio::sync::Mutex<PodNet>,
    /// Deadline of SetupNetwork (it waits for hot-plugged interfaces).
    setup_timeout: Duration,
    device_wait: Duration,
}

#[async_trait]
impl Sandbox for QemuSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn vm_pid(&self) -> u32 {
        self.vm.pid()
    }

    fn pod_pid(&self) -> Option<u32> {
        self.pod_pid
    }

    async fn wait_exit(&self) -> ExitStatus {
        let mut rx = self.vm.exit_watch();
        if rx.wait_for(|e| e.is_some()).await.is_err() {
            // The watch closes without an exit only when the runtime shuts
            // down (the shim is exiting): nothing is left to report to.
            return std::future::pending().await;
        }
        let stopped = self.stopping.load(std::sync::atomic::Ordering::SeqCst);
        ExitStatus::now(if stopped { 0 } else { 255 })
    }

    fn guest(&self) -> &dyn Guest {
        &self.guest
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

    async fn attach_devices(
        &self,
        cid: &str,
        devices: ResolvedDevices,
    ) -> Result<Vec<ContainerDevice>> {
        Ok(self.mgr.attach_container(cid, devices).await?)
    }

    async fn detach_devices(&self, cid: &str) -> Result<()> {
        Ok(self.mgr.detach_container(cid).await?)
    }

    async fn network_ready(&self) -> Result<()> {
        let mut net = self.network.lock().await;
        if net.configured {
            return Ok(());
        }
        // CNI may have run since Create (`ctr run --cni` configures the
        // task's namespace between Create and Start): plug what is new.
        let plan = network::plan(&net.netns, net.queues).await?;
        if net.given {
            plan.require_endpoints()?;
        }
        let new: Vec<_> = plan
            .endpoints
            .iter()
            .filter(|e| !net.attached.iter().any(|a| a.link == e.link))
            .cloned()
            .collect();
        network::attach(&self.mgr, &self.slot, &new, false).await?;
        net.attached.extend(new);
        crate::fault::point("start.network-pending");
        if !plan.endpoints.is_empty() {
            let req = network::setup_request(&plan, self.device_wait);
            self.guest
                .agent
                .call(
                    "SetupNetwork",
                    Some(self.setup_timeout),
                    |c, ctx| async move { c.setup_network(ctx, &req).await },
                )
                .await
                .map_err(|e| Error::from(e).context("configuring the pod network in the guest"))?;
        }
        net.configured = true;
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
        if let Err(e) = self.slot.stop().await {
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
