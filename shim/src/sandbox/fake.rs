//! A scripted sandbox for the task service's tests: records every call,
//! fails at a chosen step, and runs "processes" that exit when signalled or
//! when the test says so.
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use capsule_agent_protocol::agent;
use oci_spec::runtime::Spec;
use tokio::sync::watch;

use super::{
    AttachedDevice, ContainerRequest, ExitStatus, GuestStats, Sandbox, SandboxFactory, SharedRootfs,
};
use crate::config::Config;
use crate::error::{Error, Result};

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
    /// Device id -> attach count.
    devices: BTreeMap<String, u32>,
    containers: BTreeSet<String>,
    procs: HashMap<(String, String), Proc>,
    next_pid: u32,
    shut_down: bool,
    stats: Option<GuestStats>,
}

/// The fake sandbox. Clone shares state.
#[derive(Clone, Default)]
pub struct FakeSandbox {
    state: Arc<Mutex<State>>,
}

impl FakeSandbox {
    pub fn new() -> Self {
        Self::default()
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
    }
    pub fn calls(&self) -> Vec<String> {
        self.st().calls.clone()
    }
    /// Devices attached now (id -> count).
    pub fn attached(&self) -> BTreeMap<String, u32> {
        self.st().devices.clone()
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
    fn pid(&self) -> u32 {
        4242
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
    async fn attach_devices(&self, cid: &str, spec: &Spec) -> Result<Vec<AttachedDevice>> {
        self.call(format!("attach_devices {cid}"), None)?;
        let infos = capsule_devmgr::oci::spec_devices(spec).map_err(Error::from)?;
        let mut out = Vec::new();
        for (i, info) in infos.into_iter().enumerate() {
            let fail = self.st().fail.contains(&Step::AttachDevices);
            // Fails on the last device, after the earlier ones attached.
            if fail
                && i + 1
                    == capsule_devmgr::oci::spec_devices(spec)
                        .map(|v| v.len())
                        .unwrap_or(0)
            {
                self.detach_devices(cid, &out).await?;
                return Err(Error::internal(format!(
                    "capsule: device {}: fake attach failure",
                    info.container_path.display()
                )));
            }
            let id = format!("{}:{}", info.major, info.minor);
            *self.st().devices.entry(id.clone()).or_default() += 1;
            out.push(AttachedDevice {
                id,
                info,
                agent: agent::Device::default(),
            });
        }
        Ok(out)
    }
    async fn detach_devices(&self, cid: &str, devices: &[AttachedDevice]) -> Result<()> {
        self.call(format!("detach_devices {cid}"), None)?;
        let mut st = self.st();
        for d in devices {
            if let Some(n) = st.devices.get_mut(&d.id) {
                *n -= 1;
                if *n == 0 {
                    st.devices.remove(&d.id);
                }
            }
        }
        Ok(())
    }
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
    async fn vm_devices(&self) -> Result<serde_json::Value> {
        Ok(serde_json::json!({"devices": []}))
    }
    async fn shutdown(&self) -> Result<()> {
        self.call("shutdown".into(), None)?;
        self.st().shut_down = true;
        Ok(())
    }
}

/// Hands out one shared [`FakeSandbox`].
#[derive(Clone, Default)]
pub struct FakeFactory {
    pub sandbox: FakeSandbox,
    pub created: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl SandboxFactory for FakeFactory {
    async fn create(
        &self,
        id: &str,
        _config: &Config,
        _hostname: &str,
        _shim_address: &str,
    ) -> Result<Arc<dyn Sandbox>> {
        self.sandbox
            .call(format!("start_sandbox {id}"), Some(Step::StartSandbox))?;
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
        self.sandbox.st().shut_down = false;
        Ok(Arc::new(self.sandbox.clone()))
    }
}
