//! Fault points: named phases of Create, Start, Exec, Delete, Shutdown and
//! device attach/detach where tests SIGKILL the shim (the crash matrix).
//!
//! Armed through the environment, read once per process:
//! - `CAPSULE_FAULT`: comma-separated phase names ([`PHASES`]);
//! - `CAPSULE_FAULT_LOG`: a file that gets `"<phase> <pid>\n"` appended
//!   (and fsynced) before the kill, so a test can prove the phase was hit;
//! - `CAPSULE_FAULT_GATE`: a path; when set, an armed point fires only while
//!   that file exists (a test arms a later step of a long-lived shim, e.g.
//!   the second container of a pod).
//!
//! Debug builds only: in release builds [`point`] is an empty inline
//! function and the environment is never read.
use std::sync::Arc;

use async_trait::async_trait;
use capsule_devmgr::{
    AttachRequest, BackendError, Checkpoint, CheckpointHook, DeviceBackend, GuestAddress,
    UnplugOutcome,
};

/// Every phase, in the order a container's life reaches them.
pub const PHASES: &[&str] = &[
    // Create: the container is recorded (`creating`), nothing started.
    "create.recorded",
    // The first Create of a sandbox: virtiofsd runs and the share is
    // mounted, QEMU not started yet (the virtio-fs share's cold-plug).
    "boot.coldplug",
    // A pod network endpoint is in devices.json, nothing of it made yet.
    "net.recorded",
    // The endpoint's tap and tc filters exist; the VM does not have it yet.
    "net.plumbed",
    // QEMU runs and is recorded; the agent is not up yet.
    "boot.vm-started",
    // VM, virtiofsd and the agent are up; the container is still `creating`.
    "create.sandbox-started",
    // The rootfs is mounted and shared, recorded; no device yet.
    "create.rootfs-shared",
    // The device is in devices.json, not yet plugged.
    "attach.device-recorded",
    // Around the hypervisor's hotplug (devmgr backend).
    "attach.before-hotplug",
    "attach.after-hotplug",
    // Every device attached and recorded for the container.
    "create.devices-attached",
    // Created in the guest, `created` recorded, TaskCreate not published.
    "create.container-created",
    // TaskCreate published, the reply not sent.
    "create.before-reply",
    // The sandbox's first Start: its network endpoints plugged, the
    // guest's network not configured yet.
    "start.network-pending",
    // Start of the init process, around the agent's StartContainer.
    "start.before-agent",
    "start.after-agent",
    // Exec registered (ExecAdded published), before replying.
    "exec.added",
    // Start of an exec, around the agent's ExecProcess.
    "exec.before-agent",
    "exec.after-agent",
    // Delete of a container: before and after the guest's RemoveContainer.
    "delete.before-remove",
    "delete.after-remove",
    // Around the hypervisor's unplug (devmgr backend).
    "detach.before-unplug",
    "detach.after-unplug",
    // The device is unplugged; the container's reference not dropped yet.
    "detach.unplugged",
    // Devices detached, the rootfs still mounted.
    "delete.devices-detached",
    // Container record removed, before replying.
    "delete.before-reply",
    // Shutdown after the last container: before the VM is stopped.
    "shutdown.before-stop",
    // The VM stopped and the sandbox torn down, the shim not exited.
    "shutdown.after-stop",
];

/// Kills this process with SIGKILL when `name` is armed (debug builds).
#[cfg(debug_assertions)]
pub fn point(name: &'static str) {
    if armed::get().fires(name) {
        armed::fire(name);
    }
}

/// Release builds: nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_name: &'static str) {}

#[cfg(debug_assertions)]
mod armed {
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    /// What the environment armed (read once).
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub struct Armed {
        pub phases: Vec<String>,
        pub log: Option<PathBuf>,
        pub gate: Option<PathBuf>,
    }

    impl Armed {
        pub fn parse(fault: Option<&str>, log: Option<PathBuf>, gate: Option<PathBuf>) -> Armed {
            let phases: Vec<String> = fault
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            for p in &phases {
                if !super::PHASES.contains(&p.as_str()) {
                    tracing::warn!(phase = %p, "CAPSULE_FAULT names an unknown fault point; it never fires");
                }
            }
            Armed { phases, log, gate }
        }

        pub fn fires(&self, name: &str) -> bool {
            self.phases.iter().any(|p| p == name) && self.gate.as_ref().is_none_or(|g| g.exists())
        }
    }

    pub fn get() -> &'static Armed {
        static ARMED: OnceLock<Armed> = OnceLock::new();
        ARMED.get_or_init(|| {
            let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
            Armed::parse(
                var("CAPSULE_FAULT")
                    .and_then(|v| v.into_string().ok())
                    .as_deref(),
                var("CAPSULE_FAULT_LOG").map(PathBuf::from),
                var("CAPSULE_FAULT_GATE").map(PathBuf::from),
            )
        })
    }

    /// Logs the hit, then SIGKILLs this process. Never returns.
    pub fn fire(name: &str) {
        let pid = std::process::id();
        if let Some(log) = &get().log {
            if let Err(e) = append(log, &format!("{name} {pid}\n")) {
                tracing::error!(file = %log.display(), error = %e, "writing the fault log");
            }
        }
        tracing::warn!(phase = name, pid, "fault point: SIGKILL");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGKILL);
        // SIGKILL to ourselves is delivered before kill(2) returns to user
        // space; never go on past the fault point if it somehow is not.
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }

    fn append(path: &std::path::Path, line: &str) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        f.write_all(line.as_bytes())?;
        f.sync_all()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_lists_and_honours_the_gate() {
            let a = Armed::parse(Some(" create.recorded, exec.added ,,"), None, None);
            assert_eq!(a.phases, ["create.recorded", "exec.added"]);
            assert!(a.fires("exec.added"));
            assert!(!a.fires("exec.after-agent"));
            assert!(!Armed::parse(None, None, None).fires("create.recorded"));

            let dir = tempfile::tempdir().unwrap();
            let gate = dir.path().join("armed");
            let a = Armed::parse(Some("exec.added"), None, Some(gate.clone()));
            assert!(!a.fires("exec.added"));
            std::fs::write(&gate, b"").unwrap();
            assert!(a.fires("exec.added"));
        }

        #[test]
        fn the_log_line_is_appended() {
            let dir = tempfile::tempdir().unwrap();
            let log = dir.path().join("fault.log");
            append(&log, "a 1\n").unwrap();
            append(&log, "b 2\n").unwrap();
            assert_eq!(std::fs::read_to_string(&log).unwrap(), "a 1\nb 2\n");
        }
    }
}

/// A device backend with fault points around hotplug and unplug; everything
/// else goes straight to `B`.
pub struct FaultPoints<B: ?Sized> {
    inner: Arc<B>,
}

impl<B: DeviceBackend + ?Sized> FaultPoints<B> {
    pub fn new(inner: Arc<B>) -> Arc<Self> {
        Arc::new(Self { inner })
    }
}

/// The device manager's checkpoints as fault points.
pub fn checkpoints() -> CheckpointHook {
    Arc::new(|c| match c {
        Checkpoint::DeviceRecorded => point("attach.device-recorded"),
        Checkpoint::Unplugged => point("detach.unplugged"),
    })
}

/// `backend` with the fault points (what the shim hands its device
/// manager).
pub fn wrap<B: DeviceBackend + ?Sized>(backend: Arc<B>) -> Arc<FaultPoints<B>> {
    FaultPoints::new(backend)
}

#[async_trait]
impl<B: DeviceBackend + ?Sized> DeviceBackend for FaultPoints<B> {
    async fn hotplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        point("attach.before-hotplug");
        let r = self.inner.hotplug(req).await;
        point("attach.after-hotplug");
        r
    }

    async fn unplug(&self, req: &AttachRequest) -> Result<UnplugOutcome, BackendError> {
        point("detach.before-unplug");
        let r = self.inner.unplug(req).await;
        point("detach.after-unplug");
        r
    }

    async fn coldplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        point("boot.coldplug");
        self.inner.coldplug(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sources with fault points: every PHASES entry is used exactly
    /// where the code says, and every point in the code is listed.
    const SOURCES: &[(&str, &str)] = &[
        ("fault.rs", include_str!("fault.rs")),
        ("service/create.rs", include_str!("service/create.rs")),
        ("service/ops.rs", include_str!("service/ops.rs")),
        ("service/mod.rs", include_str!("service/mod.rs")),
        ("sandbox/qemu/mod.rs", include_str!("sandbox/qemu/mod.rs")),
        ("sandbox/network.rs", include_str!("sandbox/network.rs")),
    ];

    fn used() -> Vec<(String, &'static str)> {
        let open = concat!("point", "(\"");
        let mut v = Vec::new();
        for (file, text) in SOURCES {
            for (i, _) in text.match_indices(open) {
                let rest = &text[i + open.len()..];
                if let Some(end) = rest.find('"') {
                    v.push((rest[..end].to_string(), *file));
                }
            }
        }
        v
    }

    #[test]
    fn every_phase_is_a_point_in_the_code_and_back() {
        let used = used();
        for p in PHASES {
            let n = used.iter().filter(|(u, _)| u == p).count();
            assert_eq!(n, 1, "phase {p} is used {n} times in the shim source");
        }
        for (u, file) in &used {
            assert!(
                PHASES.contains(&u.as_str()),
                "{file}: fault point {u:?} is not in PHASES"
            );
        }
        let mut sorted = PHASES.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), PHASES.len(), "PHASES has duplicates");
    }

    #[tokio::test]
    async fn the_backend_wrapper_delegates() {
        use capsule_devmgr::testing::RecordingBackend;
        use capsule_devmgr::{BlockDriver, DeviceManager, ManagerConfig, NullStore};
        let rec = Arc::new(RecordingBackend::new());
        let mgr = DeviceManager::new(
            ManagerConfig::new(BlockDriver::VirtioScsi, 6..32),
            FaultPoints::new(rec.clone()),
            NullStore,
        )
        .unwrap();
        let dev = |n: &str| capsule_devmgr::HostDevice {
            info: None,
            host_path: format!("/dev/{n}").into(),
            kind: capsule_devmgr::DeviceKind::Block,
        };
        let owner = capsule_devmgr::Owner::runtime("test");
        let cold = mgr.new_device(owner.clone(), dev("cold0")).unwrap();
        mgr.coldplug(&cold).await.unwrap();
        let id = mgr.new_device(owner, dev("hot0")).unwrap();
        mgr.attach(&id).await.unwrap();
        assert_eq!(rec.plugged().len(), 2);
        mgr.detach(&id).await.unwrap();
        assert_eq!(rec.plugged().len(), 1);
        assert!(rec.anomalies().is_empty(), "{:?}", rec.anomalies());
    }
}
