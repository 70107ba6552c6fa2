//! The containerd Task service (`containerd.task.v2.Task`, all 17 RPCs),
//! and beside it the Sandbox API ([`sandbox_api`]) on the same state.
//!
//! One shim serves one sandbox (one VM): the first Create starts it (or,
//! with the Sandbox API, StartSandbox does), later Creates of the same pod
//! (CRI annotations) join it. Create, Delete of a
//! container and Shutdown are serialised; everything else runs
//! concurrently. Process exits are observed by one waiter task per process
//! (the agent's WaitProcess), which publishes TaskExit after the process's
//! start event and before its state turns stopped, so Delete (which needs a
//! stopped process) always publishes after the exit.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use containerd_shim::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use oci_spec::runtime::Spec;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::EventSink;
use crate::sandbox::{ExitStatus, Sandbox, SandboxFactory};
use crate::state::{SandboxPaths, SandboxStore};

mod create;
pub mod oom;
mod ops;
pub mod options;
pub mod process;
pub mod sandbox_api;
pub mod stats;

use process::Container;

/// CRI annotation: `sandbox` or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI annotation: the pod's sandbox id.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The sandbox a container belongs to: its pod's sandbox for a CRI
/// `container`, else its own id (a pod sandbox, or a lone container).
pub fn sandbox_id_of(id: &str, spec: &Spec) -> String {
    let ann = spec.annotations().as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k)).filter(|v| !v.is_empty());
    match (get(CONTAINER_TYPE).map(String::as_str), get(SANDBOX_ID)) {
        (Some("container"), Some(sb)) => sb.clone(),
        _ => id.to_string(),
    }
}

/// How the service gets its configuration.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// Read at the first Create: runtime options' config path, then
    /// `$CAPSULE_CONFIG`, then the default file.
    Load,
    /// Fixed (tests).
    Fixed(Box<Config>),
}

/// The sandbox this shim serves, once started.
pub(crate) struct Active {
    pub id: String,
    pub sandbox: Arc<dyn Sandbox>,
    pub config: Config,
    pub config_path: Option<PathBuf>,
    pub paths: SandboxPaths,
    pub store: Arc<SandboxStore>,
    pub oom: Arc<oom::OomEvents>,
    /// The sandbox's OOM watcher, stopped with it.
    pub oom_watch: tokio::task::AbortHandle,
}

pub(crate) struct Inner {
    pub namespace: String,
    pub shim_address: String,
    pub events: Arc<dyn EventSink>,
    pub factory: Arc<dyn SandboxFactory>,
    pub config_source: ConfigSource,
    pub exit: Arc<ExitSignal>,
    /// Held by Create, Delete of a container, Shutdown and the Sandbox
    /// API's changes.
    pub lifecycle: tokio::sync::Mutex<Option<Active>>,
    pub containers: Mutex<HashMap<String, Arc<Container>>>,
    /// The sandbox containerd made with the Sandbox API (none: the first
    /// container's Create starts the sandbox). Changed under `lifecycle`.
    pub pod: Mutex<Option<sandbox_api::Pod>>,
    /// The end of that sandbox, for WaitSandbox.
    pub pod_exit: tokio::sync::watch::Sender<Option<ExitStatus>>,
}

impl Inner {
    pub fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("container {id} not found")))
    }

    pub fn pod(&self) -> MutexGuard<'_, Option<sandbox_api::Pod>> {
        self.pod.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Sandbox API sandbox ended (`exit`): recorded once, WaitSandbox
    /// returns.
    pub fn pod_ended(&self, exit: ExitStatus) {
        if let Some(p) = self.pod().as_mut() {
            if !matches!(p.phase, sandbox_api::Phase::Stopped(_)) {
                if exit.status != 0 {
                    tracing::error!(sandbox = %p.id, status = exit.status, "the sandbox VM ended on its own");
                }
                p.phase = sandbox_api::Phase::Stopped(exit);
            }
        }
        self.pod_exit.send_if_modified(|e| {
            let first = e.is_none();
            if first {
                *e = Some(exit);
            }
            first
        });
    }
}

/// The task service. Cheap to clone.
#[derive(Clone)]
pub struct TaskService {
    pub(crate) inner: Arc<Inner>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        shim_address: &str,
        events: Arc<dyn EventSink>,
        factory: Arc<dyn SandboxFactory>,
        config_source: ConfigSource,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace: namespace.into(),
                shim_address: shim_address.into(),
                events,
                factory,
                config_source,
                exit,
                lifecycle: tokio::sync::Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                pod: Mutex::new(None),
                pod_exit: tokio::sync::watch::Sender::new(None),
            }),
        }
    }

    /// The Sandbox API, on this service's state (same sandbox, same
    /// containers).
    pub fn sandbox_service(&self) -> sandbox_api::SandboxService {
        sandbox_api::SandboxService {
            inner: self.inner.clone(),
        }
    }

    /// Ids of the containers served.
    pub fn container_ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.containers().keys().cloned().collect();
        v.sort();
        v
    }

    /// The sandbox's VM devices as JSON (`capsule inspect` while the shim
    /// runs; QEMU serves one QMP client, which is this shim).
    pub async fn vm_devices(&self) -> Result<serde_json::Value> {
        let sb = self
            .inner
            .lifecycle
            .lock()
            .await
            .as_ref()
            .map(|a| a.sandbox.clone());
        match sb {
            Some(sb) => sb.vm_devices().await,
            None => Err(Error::not_found("this shim runs no sandbox")),
        }
    }
}

fn reply<T>(rpc: &str, id: &str, r: Result<T>) -> ::ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::warn!(rpc, id, code = ?e.kind(), error = %e, "request failed");
        e.to_ttrpc()
    })
}

#[async_trait]
impl Task for TaskService {
    async fn state(
        &self,
        _c: &TtrpcContext,
        req: api::StateRequest,
    ) -> ::ttrpc::Result<api::StateResponse> {
        let id = req.id.clone();
        reply("State", &id, ops::state(&self.inner, req))
    }

    async fn create(
        &self,
        _c: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ::ttrpc::Result<api::CreateTaskResponse> {
        let id = req.id.clone();
        tracing::info!(id = %id, bundle = %req.bundle, "create");
        reply("Create", &id, create::create(&self.inner, req).await)
    }

    async fn start(
        &self,
        _c: &TtrpcContext,
        req: api::StartRequest,
    ) -> ::ttrpc::Result<api::StartResponse> {
        let id = req.id.clone();
        tracing::info!(id = %id, exec = %req.exec_id, "start");
        reply("Start", &id, ops::start(&self.inner, req).await)
    }

    async fn delete(
        &self,
        _c: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ::ttrpc::Result<api::DeleteResponse> {
        let id = req.id.clone();
        tracing::info!(id = %id, exec = %req.exec_id, "delete");
        reply("Delete", &id, ops::delete(&self.inner, req).await)
    }

    async fn pids(
        &self,
        _c: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ::ttrpc::Result<api::PidsResponse> {
        let id = req.id.clone();
        reply("Pids", &id, ops::pids(&self.inner, req).await)
    }

    async fn pause(&self, _c: &TtrpcContext, req: api::PauseRequest) -> ::ttrpc::Result<Empty> {
        let id = req.id.clone();
        reply("Pause", &id, ops::pause(&self.inner, req).await)
    }

    async fn resume(&self, _c: &TtrpcContext, req: api::ResumeRequest) -> ::ttrpc::Result<Empty> {
        let id = req.id.clone();
        reply("Resume", &id, ops::resume(&self.inner, req).await)
    }

    async fn checkpoint(
        &self,
        _c: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> ::ttrpc::Result<Empty> {
        reply(
            "Checkpoint",
            &req.id,
            Err(Error::unimplemented(
                "checkpoint is not supported for VM sandboxes",
            )),
        )
    }

    async fn kill(&self, _c: &TtrpcContext, req: api::KillRequest) -> ::ttrpc::Result<Empty> {
        let id = req.id.clone();
        tracing::info!(id = %id, exec = %req.exec_id, signal = req.signal, all = req.all, "kill");
        reply("Kill", &id, ops::kill(&self.inner, req).await)
    }

    async fn exec(
        &self,
        _c: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ::ttrpc::Result<Empty> {
        let id = req.id.clone();
        tracing::info!(id = %id, exec = %req.exec_id, "exec");
        reply("Exec", &id, ops::exec(&self.inner, req).await)
    }

    async fn resize_pty(
        &self,
        _c: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ::ttrpc::Result<Empty> {
        let id = req.id.clone();
        reply("ResizePty", &id, ops::resize_pty(&self.inner, req).await)
    }

    async fn close_io(
        &self,
        _c: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ::ttrpc::Result<Empty> {
        let id = req.id.clone();
        reply("CloseIO", &id, ops::close_io(&self.inner, req))
    }

    async fn update(
        &self,
        _c: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> ::ttrpc::Result<Empty> {
        let id = req.id.clone();
        reply("Update", &id, ops::update(&self.inner, req).await)
    }

    async fn wait(
        &self,
        _c: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ::ttrpc::Result<api::WaitResponse> {
        let id = req.id.clone();
        reply("Wait", &id, ops::wait(&self.inner, req).await)
    }

    async fn stats(
        &self,
        _c: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ::ttrpc::Result<api::StatsResponse> {
        let id = req.id.clone();
        reply("Stats", &id, ops::stats(&self.inner, req).await)
    }

    async fn connect(
        &self,
        _c: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ::ttrpc::Result<api::ConnectResponse> {
        let id = req.id.clone();
        reply("Connect", &id, ops::connect(&self.inner, req).await)
    }

    async fn shutdown(
        &self,
        _c: &TtrpcContext,
        req: api::ShutdownRequest,
    ) -> ::ttrpc::Result<Empty> {
        let id = req.id.clone();
        tracing::info!(id = %id, "shutdown");
        reply("Shutdown", &id, ops::shutdown(&self.inner, req).await)
    }
}

#[cfg(test)]
mod tests;
