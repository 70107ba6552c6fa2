//! A blocking CRI client: tonic over containerd's unix socket, one
//! current-thread tokio runtime, a deadline on every call.
//!
//! Errors keep the gRPC code and message (`CallError`) so a case can check
//! how a refusal was worded and how long it took.
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use super::proto::v1::image_service_client::ImageServiceClient;
use super::proto::v1::runtime_service_client::RuntimeServiceClient;
use super::proto::v1::*;

/// The default deadline of one call (a capsule RunPodSandbox boots a VM
/// under TCG).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(240);

/// A failed CRI call: which one, the gRPC status (or the deadline), and how
/// long it took.
#[derive(Debug, Clone)]
pub struct CallError {
    pub call: String,
    pub code: Option<tonic::Code>,
    pub message: String,
    pub elapsed: Duration,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(
                f,
                "{} failed after {:.1} s ({:?}): {}",
                self.call,
                self.elapsed.as_secs_f64(),
                c,
                self.message
            ),
            None => write!(
                f,
                "{} failed after {:.1} s: {}",
                self.call,
                self.elapsed.as_secs_f64(),
                self.message
            ),
        }
    }
}

impl std::error::Error for CallError {}

pub type CallResult<T> = std::result::Result<T, CallError>;

pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    image: ImageServiceClient<Channel>,
    pub socket: PathBuf,
}

impl CriClient {
    /// Connects to containerd's gRPC socket (the CRI services live there).
    pub fn connect(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the CRI client's tokio runtime")?;
        let path = socket.to_path_buf();
        let channel = rt.block_on(async {
            let p = path.clone();
            // The URI is a placeholder: the connector dials the socket.
            let ep = Endpoint::try_from("http://[::1]:0")
                .map_err(|e| anyhow!("building the CRI endpoint: {e}"))?
                .connect_timeout(Duration::from_secs(10));
            tokio::time::timeout(
                Duration::from_secs(30),
                ep.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let p = p.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(&p).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(s))
                    }
                })),
            )
            .await
            .map_err(|_| anyhow!("connecting to {} timed out", path.display()))?
            .with_context(|| format!("connecting to containerd's CRI at {}", path.display()))
        })?;
        Ok(Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            image: ImageServiceClient::new(channel),
            socket: socket.to_path_buf(),
        })
    }

    fn block<T, Fut>(&self, call: &str, timeout: Duration, fut: Fut) -> CallResult<T>
    where
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let start = Instant::now();
        // The timer must be made inside the runtime.
        let r = self
            .rt
            .block_on(async move { tokio::time::timeout(timeout, fut).await });
        let elapsed = start.elapsed();
        match r {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(s)) => Err(CallError {
                call: call.to_string(),
                code: Some(s.code()),
                message: s.message().to_string(),
                elapsed,
            }),
            Err(_) => Err(CallError {
                call: call.to_string(),
                code: None,
                message: format!("no answer within {timeout:?}"),
                elapsed,
            }),
        }
    }

    /// Any RuntimeService call: `f` gets a clone of the client.
    pub fn runtime_call<T, Fut>(
        &self,
        call: &str,
        timeout: Duration,
        f: impl FnOnce(RuntimeServiceClient<Channel>) -> Fut,
    ) -> CallResult<T>
    where
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.block(call, timeout, f(self.runtime.clone()))
    }

    pub fn version(&self) -> CallResult<VersionResponse> {
        self.runtime_call("Version", CALL_TIMEOUT, |mut c| async move {
            c.version(VersionRequest::default()).await
        })
    }

    pub fn status(&self) -> CallResult<StatusResponse> {
        self.runtime_call("Status", CALL_TIMEOUT, |mut c| async move {
            c.status(StatusRequest { verbose: false }).await
        })
    }

    pub fn run_pod_sandbox(&self, config: PodSandboxConfig, handler: &str) -> CallResult<String> {
        let req = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: handler.to_string(),
        };
        self.runtime_call("RunPodSandbox", CALL_TIMEOUT, |mut c| async move {
            c.run_pod_sandbox(req).await
        })
        .map(|r| r.pod_sandbox_id)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> CallResult<()> {
        let req = StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.runtime_call("StopPodSandbox", CALL_TIMEOUT, |mut c| async move {
            c.stop_pod_sandbox(req).await
        })
        .map(|_| ())
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> CallResult<()> {
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.runtime_call("RemovePodSandbox", CALL_TIMEOUT, |mut c| async move {
            c.remove_pod_sandbox(req).await
        })
        .map(|_| ())
    }

    pub fn pod_sandbox_status(&self, id: &str) -> CallResult<PodSandboxStatusResponse> {
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        };
        self.runtime_call("PodSandboxStatus", CALL_TIMEOUT, |mut c| async move {
            c.pod_sandbox_status(req).await
        })
    }

    pub fn list_pod_sandbox(
        &self,
        filter: Option<PodSandboxFilter>,
    ) -> CallResult<Vec<PodSandbox>> {
        let req = ListPodSandboxRequest { filter };
        self.runtime_call("ListPodSandbox", CALL_TIMEOUT, |mut c| async move {
            c.list_pod_sandbox(req).await
        })
        .map(|r| r.items)
    }

    pub fn create_container(
        &self,
        pod: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> CallResult<String> {
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        self.runtime_call("CreateContainer", CALL_TIMEOUT, |mut c| async move {
            c.create_container(req).await
        })
        .map(|r| r.container_id)
    }

    pub fn start_container(&self, id: &str) -> CallResult<()> {
        let req = StartContainerRequest {
            container_id: id.to_string(),
        };
        self.runtime_call("StartContainer", CALL_TIMEOUT, |mut c| async move {
            c.start_container(req).await
        })
        .map(|_| ())
    }

    /// StopContainer with `timeout` seconds of grace; the call's own deadline
    /// leaves room for it.
    pub fn stop_container(&self, id: &str, timeout: i64) -> CallResult<()> {
        let req = StopContainerRequest {
            container_id: id.to_string(),
            timeout,
        };
        let deadline = CALL_TIMEOUT + Duration::from_secs(timeout.max(0) as u64);
        self.runtime_call("StopContainer", deadline, |mut c| async move {
            c.stop_container(req).await
        })
        .map(|_| ())
    }

    pub fn remove_container(&self, id: &str) -> CallResult<()> {
        let req = RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.runtime_call("RemoveContainer", CALL_TIMEOUT, |mut c| async move {
            c.remove_container(req).await
        })
        .map(|_| ())
    }

    pub fn list_containers(&self, filter: Option<ContainerFilter>) -> CallResult<Vec<Container>> {
        let req = ListContainersRequest { filter };
        self.runtime_call("ListContainers", CALL_TIMEOUT, |mut c| async move {
            c.list_containers(req).await
        })
        .map(|r| r.containers)
    }

    pub fn container_status(&self, id: &str) -> CallResult<ContainerStatusResponse> {
        let req = ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: true,
        };
        self.runtime_call("ContainerStatus", CALL_TIMEOUT, |mut c| async move {
            c.container_status(req).await
        })
    }

    pub fn update_container_resources(
        &self,
        id: &str,
        linux: LinuxContainerResources,
    ) -> CallResult<()> {
        let req = UpdateContainerResourcesRequest {
            container_id: id.to_string(),
            linux: Some(linux),
            ..Default::default()
        };
        self.runtime_call(
            "UpdateContainerResources",
            CALL_TIMEOUT,
            |mut c| async move { c.update_container_resources(req).await },
        )
        .map(|_| ())
    }

    pub fn reopen_container_log(&self, id: &str) -> CallResult<()> {
        let req = ReopenContainerLogRequest {
            container_id: id.to_string(),
        };
        self.runtime_call("ReopenContainerLog", CALL_TIMEOUT, |mut c| async move {
            c.reopen_container_log(req).await
        })
        .map(|_| ())
    }

    /// ExecSync with `timeout` seconds (0: none) for the command.
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout: i64) -> CallResult<ExecSyncResponse> {
        let req = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        };
        let deadline = CALL_TIMEOUT + Duration::from_secs(timeout.max(0) as u64);
        self.runtime_call("ExecSync", deadline, |mut c| async move {
            c.exec_sync(req).await
        })
    }

    /// The streaming URL of an Exec.
    pub fn exec(&self, req: ExecRequest) -> CallResult<String> {
        self.runtime_call(
            "Exec",
            CALL_TIMEOUT,
            |mut c| async move { c.exec(req).await },
        )
        .map(|r| r.url)
    }

    /// The streaming URL of an Attach.
    pub fn attach(&self, req: AttachRequest) -> CallResult<String> {
        self.runtime_call("Attach", CALL_TIMEOUT, |mut c| async move {
            c.attach(req).await
        })
        .map(|r| r.url)
    }

    /// The streaming URL of a PortForward.
    pub fn port_forward(&self, pod: &str, ports: &[i32]) -> CallResult<String> {
        let req = PortForwardRequest {
            pod_sandbox_id: pod.to_string(),
            port: ports.to_vec(),
        };
        self.runtime_call("PortForward", CALL_TIMEOUT, |mut c| async move {
            c.port_forward(req).await
        })
        .map(|r| r.url)
    }

    pub fn container_stats(&self, id: &str) -> CallResult<ContainerStats> {
        let req = ContainerStatsRequest {
            container_id: id.to_string(),
        };
        self.runtime_call("ContainerStats", CALL_TIMEOUT, |mut c| async move {
            c.container_stats(req).await
        })
        .and_then(|r| {
            r.stats.ok_or_else(|| CallError {
                call: "ContainerStats".into(),
                code: None,
                message: "the response has no stats".into(),
                elapsed: Duration::ZERO,
            })
        })
    }

    pub fn list_container_stats(
        &self,
        filter: Option<ContainerStatsFilter>,
    ) -> CallResult<Vec<ContainerStats>> {
        let req = ListContainerStatsRequest { filter };
        self.runtime_call("ListContainerStats", CALL_TIMEOUT, |mut c| async move {
            c.list_container_stats(req).await
        })
        .map(|r| r.stats)
    }

    pub fn pod_sandbox_stats(&self, id: &str) -> CallResult<PodSandboxStats> {
        let req = PodSandboxStatsRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.runtime_call("PodSandboxStats", CALL_TIMEOUT, |mut c| async move {
            c.pod_sandbox_stats(req).await
        })
        .and_then(|r| {
            r.stats.ok_or_else(|| CallError {
                call: "PodSandboxStats".into(),
                code: None,
                message: "the response has no stats".into(),
                elapsed: Duration::ZERO,
            })
        })
    }

    /// Whether the image service knows `image` (by reference).
    pub fn image_present(&self, image: &str) -> CallResult<bool> {
        let req = ImageStatusRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: false,
        };
        let mut c = self.image.clone();
        self.block("ImageStatus", CALL_TIMEOUT, async move {
            c.image_status(req).await
        })
        .map(|r| r.image.is_some())
    }
}
