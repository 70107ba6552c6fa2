//! A scripted sandbox for the task service's tests: records every call,
//! fails at a chosen step, and runs "processes" that exit when signalled or
//! when the test says so. Its devices go through a real device manager
//! (with a recording backend and `devices.json` in the sandbox directory),
//! resolved on a fixture host of loop devices.
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use capsule_agent_protocol::agent;
use capsule_devmgr::testing::RecordingBackend;
use capsule_devmgr::{
    BlockDriver, ContainerDevice, DeviceManager, FileStore, ManagerConfig, ResolvedDevices,
    Resolver,
};
use oci_spec::runtime::Spec;
use tokio::sync::watch;

use super::{
    ContainerRequest, ExitStatus, Guest, GuestStats, Sandbox, SandboxFactory, SandboxSetup,
    SharedRootfs,
};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::state::{SandboxPaths, SandboxStore};

/// Steps the fake can be told to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    StartSandbox,
    PrepareRootfs,
    AttachDevices,
    CreateContainer,
    StartContainer,
    Exec,
    Signal,
    Pause,
    Stats,
}

#[derive(Default)]
struct Proc {
    exit: Option<watch::Sender<Option<ExitStatus>>>,
    output: VecDeque<Vec<u8>>,
    stdin: Vec<u8>,
    stdin_closed: bool,
}

#[derive(Default)]
struct State {
    calls: Vec<String>,
    fail: BTreeSet<Step>,
    /// Containers with prepared rootfs.
    rootfs: BTreeSet<String>,
    containers: BTreeSet<String>,
    procs: HashMap<(String, String), Proc>,
    next_pid: u32,
    shut_down: bool,
    stats: Option<GuestStats>,
    /// The pod pause's pid when started with pod namespaces.
    pod_pid: Option<u32>,
}

/// The fake sandbox. Clone shares state.
#[derive(Clone, Default)]
pub struct FakeSandbox {
    state: Arc<Mutex<State>>,
    /// OOM kills the "guest" saw: (container, sequence number).
    oom: Arc<watch::Sender<Vec<(String, u64)>>>,
    devices: Arc<Mutex<Option<Arc<DeviceManager>>>>,
    backend: Arc<RecordingBackend>,
    /// The "VM"'s end: set by `shutdown` (0) or `crash` (255).
    vm_exit: Arc<watch::Sender<Option<ExitStatus>>>,
}

impl FakeSandbox {
    fn manager(&self) -> Result<Arc<DeviceManager>> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Error::internal("the fake sandbox was never created"))
    }
    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn call(&self, what: String, step: Option<Step>) -> Result<()> {
        let mut st = self.st();
        st.calls.push(what.clone());
        if let Some(s) = step {
            if st.fail.contains(&s) {
                return Err(Error::internal(format!("fake failure at {s:?} ({what})")));
            }
        }
        Ok(())
    }
    pub fn fail_at(&self, step: Step) {
        self.st().fail.insert(step);
    }
    pub fn clear_failures(&self) {
        self.st().fail.clear();
        self.backend.clear_failures();
    }
    pub fn calls(&self) -> Vec<String> {
        self.st().calls.clone()
    }
    /// Devices attached now (`major:minor` of the first user -> attach
    /// count), from the device manager.
    pub fn attached(&self) -> BTreeMap<String, u32> {
        let Ok(mgr) = self.manager() else {
            return BTreeMap::new();
        };
        mgr.list()
            .into_iter()
            .filter(|r| r.attach_count > 0)
            .filter_map(|r| {
                let i = r.first_request()?;
                Some((format!("{}:{}", i.major, i.minor), r.attach_count))
            })
            .collect()
    }

    /// The device manager's record of the sandbox.
    pub fn device_manager(&self) -> Option<Arc<DeviceManager>> {
        self.manager().ok()
    }
    pub fn prepared_rootfs(&self) -> BTreeSet<String> {
        self.st().rootfs.clone()
    }
    pub fn guest_containers(&self) -> BTreeSet<String> {
        self.st().containers.clone()
    }
    pub fn is_shut_down(&self) -> bool {
        self.st().shut_down
    }
    /// The "VM" dies on its own.
    pub fn crash(&self) {
        self.vm_exit.send_replace(Some(ExitStatus::now(255)));
    }
    /// Queues output for a process (`exec_id` "" = init).
    pub fn push_output(&self, cid: &str, exec_id: &str, data: &[u8]) {
        self.st()
            .procs
            .entry((cid.into(), exec_id.into()))
            .or_default()
            .output
            .push_back(data.to_vec());
    }
    pub fn stdin_of(&self, cid: &str, exec_id: &str) -> (Vec<u8>, bool) {
        self.st()
            .procs
            .get(&(cid.into(), exec_id.into()))
            .map(|p| (p.stdin.clone(), p.stdin_closed))
            .unwrap_or_default()
    }
    pub fn set_stats(&self, s: GuestStats) {
        self.st().stats = Some(s);
    }
    /// Records an OOM kill of `cid` in the "guest" and kills its init
    /// (exit 137), as the guest kernel would.
    pub fn oom_kill(&self, cid: &str) {
        self.oom.send_modify(|v| {
            let seq = v.len() as u64 + 1;
            v.push((cid.to_string(), seq));
        });
        self.exit(cid, "", 137);
    }
    /// Makes a running process exit with `status`.
    pub fn exit(&self, cid: &str, exec_id: &str, status: u32) {
        let st = self.st();
        if let Some(tx) = st
            .procs
            .get(&(cid.into(), exec_id.into()))
            .and_then(|p| p.exit.as_ref())
        {
            tx.send_replace(Some(ExitStatus::now(status)));
        }
    }
    fn spawn(&self, cid: &str, exec_id: &str) -> u32 {
        let mut st = self.st();
        st.next_pid += 1;
        let pid = 100 + st.next_pid;
        let p = st.procs.entry((cid.into(), exec_id.into())).or_default();
        let (tx, _) = watch::channel(None);
        p.exit = Some(tx);
        pid
    }
}

#[async_trait]
impl Sandbox for FakeSandbox {
    fn id(&self) -> &str {
        "fake"
    }
    fn vm_pid(&self) -> u32 {
        4242
    }
    fn pod_pid(&self) -> Option<u32> {
        self.st().pod_pid
    }
    async fn wait_exit(&self) -> ExitStatus {
        let mut rx = self.vm_exit.subscribe();
        let got = rx.wait_for(|e| e.is_some()).await.ok().and_then(|v| *v);
        match got {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }
    fn guest(&self) -> &dyn Guest {
        self
    }
    async fn prepare_rootfs(&self, c: &ContainerRequest) -> Result<SharedRootfs> {
        self.call(
            format!("prepare_rootfs {}", c.id),
            Some(Step::PrepareRootfs),
        )?;
        self.st().rootfs.insert(c.id.clone());
        Ok(SharedRootfs {
            guest_rootfs: format!("{}/rootfs", c.id),
            spec: c.spec.clone(),
            share_mounts: vec![],
            rootfs_mounted: false,
        })
    }
    async fn release_rootfs(&self, cid: &str, _bundle: &Path) -> Result<()> {
        self.call(format!("release_rootfs {cid}"), None)?;
        self.st().rootfs.remove(cid);
        Ok(())
    }
    async fn attach_devices(
        &self,
        cid: &str,
        devices: ResolvedDevices,
    ) -> Result<Vec<ContainerDevice>> {
        self.call(format!("attach_devices {cid}"), None)?;
        let mgr = self.manager()?;
        if self.st().fail.contains(&Step::AttachDevices) {
            // Fail the last hotplug, after the earlier devices attached.
            let known: BTreeSet<_> = mgr.list().into_iter().map(|r| r.host_path).collect();
            let new = devices
                .iter()
                .filter(|d| !known.contains(&d.host_path))
                .count() as u64;
            if new == 0 {
                return Err(Error::internal("fake attach failure"));
            }
            self.backend.fail_call(self.backend.call_count() + new);
        }
        Ok(mgr.attach_container(cid, devices).await?)
    }
    async fn detach_devices(&self, cid: &str) -> Result<()> {
        self.call(format!("detach_devices {cid}"), None)?;
        Ok(self.manager()?.detach_container(cid).await?)
    }
    async fn network_ready(&self) -> Result<()> {
        self.call("network_ready".into(), None)
    }
    async fn vm_devices(&self) -> Result<serde_json::Value> {
        Ok(serde_json::json!({"devices": []}))
    }
    async fn shutdown(&self) -> Result<()> {
        self.call("shutdown".into(), None)?;
        self.st().shut_down = true;
        // The VM and everything plugged into it are gone.
        *self.devices.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.vm_exit.send_if_modified(|e| {
            let first = e.is_none();
            if first {
                *e = Some(ExitStatus::now(0));
            }
            first
        });
        Ok(())
    }
}

#[async_trait]
impl Guest for FakeSandbox {
    async fn create_container(&self, req: agent::CreateContainerRequest) -> Result<()> {
        self.call(
            format!("create_container {}", req.container_id),
            Some(Step::CreateContainer),
        )?;
        self.st().containers.insert(req.container_id.clone());
        self.spawn(&req.container_id, "");
        Ok(())
    }
    async fn start_container(&self, cid: &str) -> Result<u32> {
        self.call(format!("start_container {cid}"), Some(Step::StartContainer))?;
        Ok(1)
    }
    async fn exec_process(
        &self,
        cid: &str,
        exec_id: &str,
        _p: Vec<u8>,
        _stdin: bool,
    ) -> Result<u32> {
        self.call(format!("exec {cid}/{exec_id}"), Some(Step::Exec))?;
        Ok(self.spawn(cid, exec_id))
    }
    async fn signal_process(&self, cid: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        self.call(
            format!("signal {cid}/{exec_id} {signal} all={all}"),
            Some(Step::Signal),
        )?;
        if signal == 9 || signal == 15 {
            let st = self.st();
            for ((c, e), p) in st.procs.iter() {
                if c == cid && (all || e == exec_id) {
                    if let Some(tx) = &p.exit {
                        if tx.borrow().is_none() {
                            tx.send_replace(Some(ExitStatus::now(128 + signal)));
                        }
                    }
                }
            }
        }
        Ok(())
    }
    async fn wait_process(&self, cid: &str, exec_id: &str) -> Result<ExitStatus> {
        let rx = self
            .st()
            .procs
            .get(&(cid.into(), exec_id.into()))
            .and_then(|p| p.exit.as_ref().map(|t| t.subscribe()));
        let Some(mut rx) = rx else {
            return Err(Error::not_found(format!("no process {cid}/{exec_id}")));
        };
        let v = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| Error::internal("process gone"))?;
        v.ok_or_else(|| Error::internal("no status"))
    }
    async fn read_output(
        &self,
        cid: &str,
        exec_id: &str,
        stderr: bool,
        _len: u32,
    ) -> Result<Vec<u8>> {
        if stderr {
            // Ends with the process.
            self.wait_process(cid, exec_id).await?;
            return Ok(vec![]);
        }
        loop {
            let (data, rx) = {
                let mut st = self.st();
                let p = st.procs.entry((cid.into(), exec_id.into())).or_default();
                (p.output.pop_front(), p.exit.as_ref().map(|t| t.subscribe()))
            };
            if let Some(d) = data {
                return Ok(d);
            }
            let Some(mut rx) = rx else { return Ok(vec![]) };
            if rx.borrow().is_some() {
                return Ok(vec![]);
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(20), rx.changed()).await;
        }
    }
    async fn write_stdin(&self, cid: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        self.st()
            .procs
            .entry((cid.into(), exec_id.into()))
            .or_default()
            .stdin
            .extend_from_slice(data);
        Ok(data.len())
    }
    async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<()> {
        self.st()
            .procs
            .entry((cid.into(), exec_id.into()))
            .or_default()
            .stdin_closed = true;
        Ok(())
    }
    async fn resize_pty(&self, cid: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        self.call(format!("resize {cid}/{exec_id} {rows}x{cols}"), None)
    }
    async fn pause(&self, cid: &str) -> Result<()> {
        self.call(format!("pause {cid}"), Some(Step::Pause))
    }
    async fn resume(&self, cid: &str) -> Result<()> {
        self.call(format!("resume {cid}"), None)
    }
    async fn update(&self, cid: &str, resources: Vec<u8>) -> Result<()> {
        self.call(
            format!("update {cid} {}", String::from_utf8_lossy(&resources)),
            None,
        )
    }
    async fn stats(&self, cid: &str) -> Result<GuestStats> {
        self.call(format!("stats {cid}"), Some(Step::Stats))?;
        Ok(self.st().stats.clone().unwrap_or_default())
    }
    async fn list_processes(&self, cid: &str) -> Result<Vec<(u32, String)>> {
        self.call(format!("pids {cid}"), None)?;
        Ok(vec![(1, String::new())])
    }
    async fn remove_container(&self, cid: &str) -> Result<()> {
        self.call(format!("remove_container {cid}"), None)?;
        self.st().containers.remove(cid);
        Ok(())
    }
    async fn next_oom_event(&self, after: u64) -> Result<(String, u64)> {
        let mut rx = self.oom.subscribe();
        loop {
            let next = rx.borrow().iter().find(|(_, seq)| *seq > after).cloned();
            if let Some(e) = next {
                return Ok(e);
            }
            rx.changed()
                .await
                .map_err(|_| Error::internal("fake OOM events gone"))?;
        }
    }
}

/// Hands out one shared [`FakeSandbox`], and resolves devices on a fixture
/// host of loop devices (`b 7:0` … `b 7:7`), counting every resolution.
#[derive(Clone)]
pub struct FakeFactory {
    pub sandbox: FakeSandbox,
    pub created: Arc<Mutex<Vec<String>>>,
    /// What each create was given.
    pub setups: Arc<Mutex<Vec<SandboxSetup>>>,
    host: Resolver,
    /// `resolve_devices` calls, and devices resolved by them.
    pub resolutions: Arc<AtomicUsize>,
    pub devices_resolved: Arc<AtomicUsize>,
}

impl FakeFactory {
    /// A factory whose fixture host lives in `dir`.
    pub fn new(dir: &Path) -> Self {
        let host = match capsule_devmgr::testing::loop_host(dir, 8) {
            Ok(h) => h,
            Err(e) => panic!("fixture host in {}: {e}", dir.display()),
        };
        Self {
            sandbox: FakeSandbox::default(),
            created: Arc::default(),
            setups: Arc::default(),
            host,
            resolutions: Arc::default(),
            devices_resolved: Arc::default(),
        }
    }
}

#[async_trait]
impl SandboxFactory for FakeFactory {
    fn resolve_devices(&self, _config: &Config, spec: &Spec) -> Result<ResolvedDevices> {
        self.resolutions.fetch_add(1, Ordering::SeqCst);
        let r = self.host.resolve_spec(spec)?;
        self.devices_resolved.fetch_add(r.len(), Ordering::SeqCst);
        Ok(r)
    }

    async fn create(
        &self,
        id: &str,
        config: &Config,
        _store: Arc<SandboxStore>,
        setup: &SandboxSetup,
    ) -> Result<Arc<dyn Sandbox>> {
        self.sandbox
            .call(format!("start_sandbox {id}"), Some(Step::StartSandbox))?;
        let paths = SandboxPaths::new(&config.state_dir, id);
        let store = FileStore::open(&paths.dir).map_err(|e| Error::internal(e.to_string()))?;
        self.sandbox.backend.clear_failures();
        let mgr = DeviceManager::new(
            ManagerConfig::new(BlockDriver::VirtioScsi, 6..32),
            self.sandbox.backend.clone(),
            store,
        )?;
        *self
            .sandbox
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(mgr));
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
        self.setups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(setup.clone());
        {
            let mut st = self.sandbox.st();
            st.shut_down = false;
            st.pod_pid = setup.pod_namespaces.then_some(77);
        }
        self.sandbox.vm_exit.send_replace(None);
        Ok(Arc::new(self.sandbox.clone()))
    }
}
