//! The ttrpc `capsule.agent.v1.Agent` service: decodes requests, calls the
//! sandbox, maps errors to status codes.
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use capsule_agent_protocol::agent::*;
use capsule_agent_protocol::agent_ttrpc::Agent;
use capsule_agent_protocol::PROTOCOL;
use oci_spec::runtime::LinuxResources;
use ttrpc::r#async::TtrpcContext;

use crate::container::spec;
use crate::error::{AgentError, Result};
use crate::paths::valid_id;
use crate::sandbox::Sandbox;

pub struct AgentService {
    pub sandbox: Arc<Sandbox>,
    /// Extra feature names for GuestDetails (transport-dependent).
    pub features: Vec<String>,
    pub network: crate::network::Network,
}

type TtResult<T> = ttrpc::Result<T>;

fn done<T>(rpc: &str, r: Result<T>) -> TtResult<T> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => {
            tracing::warn!(rpc, code = ?e.code(), "{e}");
            Err(e.into())
        }
    }
}

fn signal_number(what: &str, sig: u32) -> Result<i32> {
    if sig > 64 {
        return Err(AgentError::invalid(format!(
            "{what}: signal {sig} is not a signal number"
        )));
    }
    Ok(sig as i32)
}

fn exec_id_ok(cid: &str, exec_id: &str) -> Result<()> {
    if !valid_id(exec_id) {
        return Err(AgentError::invalid(format!(
            "container {cid:?}: exec id {exec_id:?} is not valid"
        )));
    }
    Ok(())
}

impl AgentService {
    pub fn new(sandbox: Arc<Sandbox>, features: Vec<String>) -> Self {
        Self {
            sandbox,
            features,
            network: crate::network::Network::new(),
        }
    }

    fn guest_details(&self) -> GuestDetailsResponse {
        let mut r = GuestDetailsResponse::new();
        r.kernel_version = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        r.agent_version = env!("CARGO_PKG_VERSION").to_string();
        r.protocol = PROTOCOL.to_string();
        r.features = [
            "serial-session-handshake",
            "cgroup-v2",
            "pid-namespace",
            "pty",
            "virtiofs",
            "devices",
            "exec",
            "network",
            "pod-namespaces",
            "pod-pause",
            "seccomp",
            "oom-events",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(self.features.iter().cloned())
        .collect();
        r
    }

    async fn wait(&self, req: &ProcessRequest) -> Result<WaitProcessResponse> {
        let c = self.sandbox.container(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        let exit = p.wait().await;
        p.mark_exit_reported();
        let mut r = WaitProcessResponse::new();
        r.status = exit.status;
        if let Ok(d) = exit.at.duration_since(UNIX_EPOCH) {
            r.exited_at_secs = d.as_secs() as i64;
            r.exited_at_nanos = d.subsec_nanos();
        }
        c.forget_exec_if_done(&req.exec_id).await;
        Ok(r)
    }

    async fn read(&self, req: &ReadStreamRequest, stderr: bool) -> Result<ReadStreamResponse> {
        let c = self.sandbox.container(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        let what = p.name(&req.container_id);
        let data = if stderr {
            p.stdio.read_stderr(req.len as usize).await
        } else {
            p.stdio.read_stdout(req.len as usize).await
        }
        .map_err(|e| {
            AgentError::internal(
                format!("{what}: read {}", if stderr { "stderr" } else { "stdout" }),
                e,
            )
        })?;
        if data.is_empty() {
            c.forget_exec_if_done(&req.exec_id).await;
        }
        let mut r = ReadStreamResponse::new();
        r.data = data;
        Ok(r)
    }

    async fn signal(&self, req: &SignalProcessRequest) -> Result<()> {
        let c = self.sandbox.container(&req.container_id)?;
        let sig = signal_number(&format!("container {:?}", req.container_id), req.signal)?;
        if req.all {
            return c.signal_all(sig);
        }
        let p = c.process(&req.exec_id)?;
        let r = if req.exec_id.is_empty() {
            c.signal_init(sig)
        } else {
            p.signal(sig)
        };
        r.map_err(|e| {
            if e.raw_os_error() == Some(libc::ESRCH) {
                AgentError::NotFound(format!(
                    "{}: process already exited",
                    p.name(&req.container_id)
                ))
            } else {
                AgentError::internal(format!("{}: signal {sig}", p.name(&req.container_id)), e)
            }
        })
    }
}

#[async_trait]
impl Agent for AgentService {
    async fn health(&self, _: &TtrpcContext, _: HealthRequest) -> TtResult<HealthResponse> {
        let mut r = HealthResponse::new();
        r.serving = true;
        Ok(r)
    }

    async fn guest_details(
        &self,
        _: &TtrpcContext,
        _: GuestDetailsRequest,
    ) -> TtResult<GuestDetailsResponse> {
        Ok(AgentService::guest_details(self))
    }

    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> TtResult<CreateSandboxResponse> {
        tracing::info!(sandbox = %req.sandbox_id, storages = req.storages.len(), pod_namespaces = req.pod_namespaces, "CreateSandbox");
        let r = self
            .sandbox
            .create_sandbox(&req.hostname, &req.storages, req.pod_namespaces)
            .await
            .and_then(|pid| {
                let pod_pid = match pid {
                    None => 0,
                    Some(p) => u32::try_from(p).map_err(|_| {
                        AgentError::Internal(format!("the pod's pause has pid {p}"))
                    })?,
                };
                Ok(CreateSandboxResponse {
                    pod_pid,
                    ..Default::default()
                })
            });
        done("CreateSandbox", r)
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        req: DestroySandboxRequest,
    ) -> TtResult<Empty> {
        tracing::info!(sandbox = %req.sandbox_id, "DestroySandbox");
        done(
            "DestroySandbox",
            self.sandbox.destroy_sandbox().await.map(|_| Empty::new()),
        )
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> TtResult<Empty> {
        tracing::info!(cid = %req.container_id, rootfs = %req.rootfs, devices = req.devices.len(), "CreateContainer");
        done(
            "CreateContainer",
            self.sandbox
                .create_container(req)
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> TtResult<StartContainerResponse> {
        let r = async {
            let c = self.sandbox.container(&req.container_id)?;
            let mut r = StartContainerResponse::new();
            r.pid = c.start().await?;
            Ok(r)
        }
        .await;
        done("StartContainer", r)
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> TtResult<Empty> {
        let timeout = Duration::from_secs(if req.timeout == 0 {
            10
        } else {
            u64::from(req.timeout)
        });
        let r = self
            .sandbox
            .remove_container(&req.container_id, timeout)
            .await;
        done("RemoveContainer", r.map(|_| Empty::new()))
    }

    async fn pause_container(&self, _: &TtrpcContext, req: ContainerRequest) -> TtResult<Empty> {
        let r = async { self.sandbox.container(&req.container_id)?.pause().await }.await;
        done("PauseContainer", r.map(|_| Empty::new()))
    }

    async fn resume_container(&self, _: &TtrpcContext, req: ContainerRequest) -> TtResult<Empty> {
        let r = async { self.sandbox.container(&req.container_id)?.resume().await }.await;
        done("ResumeContainer", r.map(|_| Empty::new()))
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> TtResult<Empty> {
        let r = (|| {
            let c = self.sandbox.container(&req.container_id)?;
            let res: LinuxResources =
                serde_json::from_slice(&req.resources).map_err(|e| AgentError::Json {
                    what: format!(
                        "container {:?}: resources are not valid OCI LinuxResources",
                        req.container_id
                    ),
                    source: e,
                })?;
            c.cgroup.apply(&req.container_id, &res)
        })();
        done("UpdateContainer", r.map(|_| Empty::new()))
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> TtResult<StatsContainerResponse> {
        let r = self.sandbox.container(&req.container_id).map(|c| {
            let mut r = StatsContainerResponse::new();
            r.cgroup = protobuf::MessageField::some(c.cgroup.stats());
            r.cgroup_version = "v2".into();
            r
        });
        done("StatsContainer", r)
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> TtResult<ListProcessesResponse> {
        let r = self.sandbox.container(&req.container_id).map(|c| {
            let mut r = ListProcessesResponse::new();
            r.processes = c
                .processes()
                .into_iter()
                .map(|(pid, exec_id)| {
                    let mut p = ProcessInfo::new();
                    p.pid = pid as u32;
                    p.exec_id = exec_id;
                    p
                })
                .collect();
            r
        });
        done("ListProcesses", r)
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> TtResult<ExecProcessResponse> {
        tracing::info!(cid = %req.container_id, exec = %req.exec_id, "ExecProcess");
        let r = async {
            exec_id_ok(&req.container_id, &req.exec_id)?;
            let c = self.sandbox.container(&req.container_id)?;
            let what = format!("container {:?} exec {:?}", req.container_id, req.exec_id);
            let process = spec::parse_process(&what, &req.process)?;
            spec::cap_sets(&what, &process)?;
            let pid = c
                .exec(
                    crate::container::Spawn {
                        reaper: &self.sandbox.reaper,
                    },
                    &req.exec_id,
                    process,
                    req.stdin,
                )
                .await?;
            let mut r = ExecProcessResponse::new();
            r.pid = pid;
            Ok(r)
        }
        .await;
        done("ExecProcess", r)
    }

    async fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> TtResult<Empty> {
        done(
            "SignalProcess",
            self.signal(&req).await.map(|_| Empty::new()),
        )
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> TtResult<WaitProcessResponse> {
        done("WaitProcess", self.wait(&req).await)
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> TtResult<WriteStreamResponse> {
        let r = async {
            let c = self.sandbox.container(&req.container_id)?;
            let p = c.process(&req.exec_id)?;
            let what = p.name(&req.container_id);
            match p.stdio.write_stdin(&req.data).await {
                Ok(Some(n)) => {
                    let mut r = WriteStreamResponse::new();
                    r.len = n as u32;
                    Ok(r)
                }
                Ok(None) => Err(AgentError::FailedPrecondition(format!(
                    "{what}: stdin is closed or was not requested"
                ))),
                Err(e) => Err(AgentError::internal(format!("{what}: write stdin"), e)),
            }
        }
        .await;
        done("WriteStdin", r)
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> TtResult<ReadStreamResponse> {
        done("ReadStdout", self.read(&req, false).await)
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> TtResult<ReadStreamResponse> {
        done("ReadStderr", self.read(&req, true).await)
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> TtResult<Empty> {
        let r = async {
            let c = self.sandbox.container(&req.container_id)?;
            let p = c.process(&req.exec_id)?;
            p.stdio.close_stdin().await.map_err(|e| {
                AgentError::internal(format!("{}: close stdin", p.name(&req.container_id)), e)
            })
        }
        .await;
        done("CloseStdin", r.map(|_| Empty::new()))
    }

    async fn tty_win_resize(&self, _: &TtrpcContext, req: TtyWinResizeRequest) -> TtResult<Empty> {
        let r = (|| {
            let c = self.sandbox.container(&req.container_id)?;
            let p = c.process(&req.exec_id)?;
            let what = p.name(&req.container_id);
            let (Ok(rows), Ok(cols)) = (u16::try_from(req.rows), u16::try_from(req.cols)) else {
                return Err(AgentError::invalid(format!(
                    "{what}: window size {}x{} too large",
                    req.rows, req.cols
                )));
            };
            match p.stdio.resize(rows, cols) {
                None => Err(AgentError::FailedPrecondition(format!(
                    "{what}: has no terminal"
                ))),
                Some(r) => {
                    r.map_err(|e| AgentError::internal(format!("{what}: resize terminal"), e))
                }
            }
        })();
        done("TtyWinResize", r.map(|_| Empty::new()))
    }

    async fn add_device(
        &self,
        _: &TtrpcContext,
        req: AddDeviceRequest,
    ) -> TtResult<AddDeviceResponse> {
        let r = async {
            let d = req.device.into_option().ok_or_else(|| {
                AgentError::invalid(format!(
                    "container {:?}: AddDevice without a device",
                    req.container_id
                ))
            })?;
            let (major, minor) = self.sandbox.add_device(&req.container_id, d).await?;
            let mut r = AddDeviceResponse::new();
            r.guest_major = i64::from(major);
            r.guest_minor = i64::from(minor);
            Ok(r)
        }
        .await;
        done("AddDevice", r)
    }

    async fn setup_network(&self, _: &TtrpcContext, req: SetupNetworkRequest) -> TtResult<Empty> {
        tracing::info!(
            interfaces = req.interfaces.len(),
            routes = req.routes.len(),
            "SetupNetwork"
        );
        let r = self.network.setup(&req).await;
        done("SetupNetwork", r.map(|_| Empty::new()))
    }

    async fn get_oom_event(&self, _: &TtrpcContext, req: GetOOMEventRequest) -> TtResult<OOMEvent> {
        let e = self.sandbox.oom.next_after(req.after).await;
        tracing::debug!(cid = %e.container_id, seq = e.seq, "GetOOMEvent");
        let mut r = OOMEvent::new();
        r.container_id = e.container_id;
        r.seq = e.seq;
        Ok(r)
    }

    async fn remove_device(&self, _: &TtrpcContext, req: RemoveDeviceRequest) -> TtResult<Empty> {
        let r = self
            .sandbox
            .remove_device(&req.container_id, &req.container_path)
            .await;
        done("RemoveDevice", r.map(|_| Empty::new()))
    }
}
