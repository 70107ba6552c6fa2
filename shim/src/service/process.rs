//! Containers and processes as the service tracks them.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::Mount as ApiMount;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::io::{HostIo, ProcessIo, StdioConfig, Stream, Streams};
use crate::sandbox::{ExitStatus, Sandbox};
use crate::state::{ContainerRecord, ContainerStatus, SandboxStore};
use crate::task::{Op, Status};

/// How long output may take to drain after a process exited, before its
/// exit is published anyway.
pub const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct ProcState {
    status: Status,
    pid: u32,
}

/// One process: a container's init (`exec_id` empty) or an exec.
pub struct Process {
    pub container_id: String,
    pub exec_id: String,
    pub stdio: StdioConfig,
    /// OCI Process JSON (execs).
    pub spec: Option<Vec<u8>>,
    state: Mutex<ProcState>,
    exit: watch::Sender<Option<ExitStatus>>,
    host_io: Mutex<Option<HostIo>>,
    io: Mutex<Option<Arc<ProcessIo>>>,
    waiter: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("container_id", &self.container_id)
            .field("exec_id", &self.exec_id)
            .field("state", &self.st())
            .finish()
    }
}

impl Process {
    /// A process not started yet. `pid` is what containerd is told until it
    /// starts: for a container's init, the VM's (QEMU's) pid, which lives in
    /// the pod's network namespace (`ctr run --cni` configures the task's
    /// `/proc/<pid>/ns/net` between Create and Start); the guest pid once it
    /// runs.
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioConfig,
        spec: Option<Vec<u8>>,
        host_io: HostIo,
        pid: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            spec,
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid,
            }),
            exit: watch::channel(None).0,
            host_io: Mutex::new(Some(host_io)),
            io: Mutex::new(None),
            waiter: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn st(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `container c1` or `exec e1 of container c1`.
    pub fn what(&self) -> String {
        if self.exec_id.is_empty() {
            format!("container {}", self.container_id)
        } else {
            format!("exec {} of container {}", self.exec_id, self.container_id)
        }
    }

    pub fn status(&self) -> Status {
        self.st().status
    }

    pub fn pid(&self) -> u32 {
        self.st().pid
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Checks `op` is allowed now, changing nothing.
    pub fn check(&self, op: Op) -> Result<Status> {
        self.st().status.apply(op, &self.what())
    }

    /// Applies `op` atomically; returns the state it left (so a caller that
    /// holds a transitional state knows where it came from).
    pub fn transition(&self, op: Op) -> Result<Status> {
        let mut st = self.st();
        let before = st.status;
        st.status = before.apply(op, &self.what())?;
        Ok(before)
    }

    /// Ends `Starting`: running as guest pid `pid` (or stopped already).
    pub fn started(&self, pid: u32) -> Result<()> {
        let mut st = self.st();
        st.status = st.status.apply(Op::Started, &self.what())?;
        st.pid = pid;
        Ok(())
    }

    /// Records the exit and wakes every waiter. Idempotent.
    pub fn mark_exited(&self, exit: ExitStatus) {
        {
            let mut st = self.st();
            if let Ok(next) = st.status.apply(Op::Exit, &self.what()) {
                st.status = next;
            }
        }
        self.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(exit);
                true
            } else {
                false
            }
        });
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> ExitStatus {
        let mut rx = self.exit.subscribe();
        let got = rx.wait_for(|e| e.is_some()).await.ok().and_then(|v| *v);
        got.unwrap_or_else(|| ExitStatus::now(255))
    }

    /// True the first time only: whoever gets it spawns the exit waiter.
    pub fn claim_waiter(&self) -> bool {
        !self.waiter.swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// Starts copying stdio (once).
    pub fn start_io(&self, streams: Arc<dyn Streams>) {
        let host = self
            .host_io
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(host) = host {
            *self.io.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Arc::new(ProcessIo::start(host, streams)));
        }
    }

    pub fn io(&self) -> Option<Arc<ProcessIo>> {
        self.io.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Closes the host stdio (waiting briefly for output).
    pub async fn close_io(&self) {
        drop(
            self.host_io
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(io) = self.io() {
            io.shutdown(OUTPUT_DRAIN).await;
        }
    }
}

/// A container of this shim's sandbox.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<ApiMount>,
    pub sandbox: Arc<dyn Sandbox>,
    pub init: Arc<Process>,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    pub record: Mutex<ContainerRecord>,
    pub store: Arc<SandboxStore>,
    /// The sandbox's OOM events.
    pub oom: Arc<super::oom::OomEvents>,
}

impl Container {
    /// Records a new status in `sandbox.json` (best effort: the record only
    /// guides cleanup, which does not depend on the status).
    pub fn set_status(&self, status: ContainerStatus) {
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        rec.status = status;
        if let Err(e) = self.store.set_status(&self.id, status) {
            tracing::warn!(container = %self.id, error = %e, "cannot record the container status");
        }
    }

    pub fn exec(&self, exec_id: &str) -> Result<Arc<Process>> {
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!("exec {exec_id} of container {} not found", self.id))
            })
    }

    /// The init process (`exec_id` empty) or an exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            Ok(self.init.clone())
        } else {
            self.exec(exec_id)
        }
    }

    pub fn execs(&self) -> Vec<Arc<Process>> {
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// A process's guest stdio through the sandbox's agent.
pub struct AgentStreams {
    pub sandbox: Arc<dyn Sandbox>,
    pub container_id: String,
    pub exec_id: String,
}

#[async_trait]
impl Streams for AgentStreams {
    async fn read(&self, stream: Stream, len: u32) -> Result<Vec<u8>> {
        self.sandbox
            .guest()
            .read_output(
                &self.container_id,
                &self.exec_id,
                stream == Stream::Stderr,
                len,
            )
            .await
    }
    async fn write_stdin(&self, data: &[u8]) -> Result<usize> {
        self.sandbox
            .guest()
            .write_stdin(&self.container_id, &self.exec_id, data)
            .await
    }
    async fn close_stdin(&self) -> Result<()> {
        self.sandbox
            .guest()
            .close_stdin(&self.container_id, &self.exec_id)
            .await
    }
}
