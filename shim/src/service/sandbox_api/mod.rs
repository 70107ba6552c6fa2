//! containerd's Sandbox API (`containerd.runtime.sandbox.v1.Sandbox`), served
//! next to the task service on the same socket. containerd 2.x calls it for
//! a runtime configured with `sandboxer = "shim"` (docs/sandbox-api.md):
//!
//! 1. it makes the pod's network namespace and runs CNI in it;
//! 2. it starts the shim with `-id <sandbox>` in a bundle of the shim
//!    sandbox controller (no `config.json`; see `bootstrap::protocol`
//!    for the reply version this gets);
//! 3. CreateSandbox (the CRI `PodSandboxConfig` as options, the netns path):
//!    validated and recorded here, nothing starts;
//! 4. StartSandbox: the VM boots (virtiofsd, QEMU, agent), the pod network is
//!    plugged, and the agent makes the pod's pid/ipc/uts namespaces, held by
//!    a pause process of its own: its guest pid is the sandbox pid CRI puts
//!    in every container's spec (`/proc/<pid>/ns/{pid,ipc,uts}`), which the
//!    agent joins. There is no pause container;
//! 5. the pod's containers are created as tasks on the same socket: they
//!    join this sandbox as a pause container's pod would;
//! 6. StopSandbox (after CRI stopped the containers): the VM stops and the
//!    sandbox's host state is removed, exactly as the last Delete +
//!    Shutdown do for a pause-container pod; WaitSandbox returns;
//! 7. ShutdownSandbox: the shim exits; containerd then runs `delete` with
//!    the sandbox's bundle, which finds nothing left.
//!
//! State: [`Pod`] in the service's `Inner`, beside the running sandbox
//! (`Inner::lifecycle`), both changed under the lifecycle lock.
pub mod pod_config;
mod rpc;

pub use rpc::SandboxService;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::sandbox_api as api;

use super::{Active, Inner};
use crate::cleanup::{self, KillTiming, RealProcesses};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::sandbox::network::PodNetwork;
use crate::sandbox::{host_share, ExitStatus, GuestStats, SandboxSetup};
use crate::state::{self, BundleRecord, SandboxPaths};
use pod_config::{NamespaceMode, PodConfig};

/// Where a Sandbox API sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// CreateSandbox recorded it.
    Created,
    /// StartSandbox booted it.
    Ready,
    /// Stopped (StopSandbox) or its VM ended.
    Stopped(ExitStatus),
}

/// The sandbox containerd made through the Sandbox API.
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub bundle: PathBuf,
    pub setup: SandboxSetup,
    pub config: Config,
    pub config_path: Option<PathBuf>,
    pub phase: Phase,
    /// The pod pause's guest pid (once started).
    pub pid: u32,
    pub created_at: SystemTime,
    /// Started at (StartSandbox).
    pub started_at: Option<SystemTime>,
}

fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    MessageField::some(Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    })
}

fn exit_timestamp(e: &ExitStatus) -> MessageField<Timestamp> {
    MessageField::some(Timestamp {
        seconds: e.exited_at_secs,
        nanos: i32::try_from(e.exited_at_nanos).unwrap_or(0),
        ..Default::default()
    })
}

/// What a sandbox of `req` needs, refusing what a VM cannot give a pod:
/// the host's network (no netns path, or CRI's NODE network mode) or IPC,
/// a user namespace, pod sysctls (not applied without a pause container
/// yet).
pub fn setup_of(req: &api::CreateSandboxRequest, pod: &PodConfig) -> Result<SandboxSetup> {
    let who = format!("pod sandbox {}", req.sandbox_id);
    if pod.network == NamespaceMode::Node || req.netns_path.is_empty() {
        return Err(host_share::host_network(&format!(
            "{who} uses the host's network namespace (hostNetwork)"
        )));
    }
    if pod.ipc == NamespaceMode::Node {
        return Err(host_share::host_ipc(&format!(
            "{who} uses the host's IPC namespace (hostIPC)"
        )));
    }
    if pod.user_namespace {
        return Err(Error::invalid(format!(
            "{who} asks for a user namespace (hostUsers: false): user namespaces are not supported in capsule's guest"
        )));
    }
    if !pod.sysctls.is_empty() {
        return Err(Error::invalid(format!(
            "{who} sets pod sysctls ({}): they are not applied with sandboxer = \"shim\" yet; use sandboxer = \"podsandbox\" for this runtime",
            pod.sysctls.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(SandboxSetup {
        hostname: pod.hostname.clone(),
        network: PodNetwork::Netns(PathBuf::from(&req.netns_path)),
        pod_namespaces: true,
    })
}

/// The pod of `id`, or NOT_FOUND naming what this shim has.
fn pod_of(inner: &Inner, id: &str) -> Result<Pod> {
    match inner.pod().as_ref() {
        Some(p) if p.id == id => Ok(p.clone()),
        Some(p) => Err(Error::not_found(format!(
            "sandbox {id} not found: this shim serves sandbox {}",
            p.id
        ))),
        None => Err(Error::not_found(format!(
            "sandbox {id} not found: CreateSandbox was not called on this shim"
        ))),
    }
}

pub(crate) async fn create(
    inner: &Inner,
    req: api::CreateSandboxRequest,
) -> Result<api::CreateSandboxResponse> {
    let id = req.sandbox_id.clone();
    state::check_id("sandbox id", &id)?;
    let lifecycle = inner.lifecycle.lock().await;
    if let Some(p) = inner.pod().as_ref() {
        return Err(Error::exists(format!(
            "sandbox {} was created on this shim already",
            p.id
        )));
    }
    if let Some(a) = lifecycle.as_ref() {
        return Err(Error::precondition(format!(
            "this shim already runs sandbox {}, started by its first container",
            a.id
        )));
    }
    let pod = pod_config::parse(req.options.as_ref())?;
    let setup = setup_of(&req, &pod)?;
    let (config, config_path) = super::create::load_config(inner, None)?;
    let bundle = PathBuf::from(&req.bundle_path);
    if !req.bundle_path.is_empty() {
        // `delete` (after a crash of this shim) finds the sandbox from here.
        state::save(
            &bundle.join(state::BUNDLE_FILE),
            &BundleRecord {
                version: state::STATE_VERSION,
                container_id: id.clone(),
                sandbox_id: id.clone(),
                state_dir: config.state_dir.clone(),
                config_path: config_path.clone(),
            },
        )?;
    }
    tracing::info!(sandbox = %id, netns = %req.netns_path, hostname = %setup.hostname, "sandbox created");
    *inner.pod() = Some(Pod {
        id,
        bundle,
        setup,
        config,
        config_path,
        phase: Phase::Created,
        pid: 0,
        created_at: SystemTime::now(),
        started_at: None,
    });
    drop(lifecycle);
    Ok(api::CreateSandboxResponse::default())
}

pub(crate) async fn start(
    inner: &Arc<Inner>,
    req: api::StartSandboxRequest,
) -> Result<api::StartSandboxResponse> {
    let mut lifecycle = inner.lifecycle.lock().await;
    let pod = pod_of(inner, &req.sandbox_id)?;
    match pod.phase {
        Phase::Created => {}
        Phase::Ready => {
            return Ok(api::StartSandboxResponse {
                pid: pod.pid,
                created_at: timestamp(pod.started_at.unwrap_or(pod.created_at)),
                ..Default::default()
            })
        }
        Phase::Stopped(_) => {
            return Err(Error::precondition(format!(
                "sandbox {} was stopped: it cannot start again",
                pod.id
            )))
        }
    }
    let id = pod.id.clone();
    let paths = SandboxPaths::new(&pod.config.state_dir, &id);
    let store = super::create::open_store(inner, &paths, &id)?;
    let started = async {
        let sb = inner
            .factory
            .create(&id, &pod.config, store.clone(), &pod.setup)
            .await?;
        let ready = async {
            // CNI ran before CreateSandbox: the pod's links are there now.
            sb.network_ready().await?;
            sb.pod_pid()
                .ok_or_else(|| Error::internal("the sandbox started without the pod's namespaces"))
        }
        .await;
        match ready {
            Ok(pid) => Ok((sb, pid)),
            Err(e) => {
                if let Err(s) = sb.shutdown().await {
                    return Err(e.note(format!("stopping the sandbox: {s}")));
                }
                Err(e)
            }
        }
    }
    .await;
    let (sb, pid) = match started {
        Ok(v) => v,
        Err(e) => {
            let report =
                cleanup::teardown(&paths, &[], &RealProcesses, KillTiming::default()).await;
            return Err(if report.is_clean() {
                e
            } else {
                e.note(format!("cleanup trouble: {}", report.errors.join("; ")))
            });
        }
    };
    let oom = super::oom::OomEvents::new(sb.clone(), inner.events.clone());
    let oom_watch = tokio::spawn(oom.clone().watch()).abort_handle();
    *lifecycle = Some(Active {
        id: id.clone(),
        sandbox: sb.clone(),
        config: pod.config.clone(),
        config_path: pod.config_path.clone(),
        paths,
        store,
        oom,
        oom_watch,
    });
    let now = SystemTime::now();
    if let Some(p) = inner.pod().as_mut() {
        p.phase = Phase::Ready;
        p.pid = pid;
        p.started_at = Some(now);
    }
    drop(lifecycle);
    let watcher = inner.clone();
    tokio::spawn(async move {
        let exit = sb.wait_exit().await;
        watcher.pod_ended(exit);
    });
    tracing::info!(sandbox = %id, pod_pid = pid, "sandbox started");
    Ok(api::StartSandboxResponse {
        pid,
        created_at: timestamp(now),
        ..Default::default()
    })
}

/// Stops the running sandbox: its VM and every host resource, as the last
/// Delete + Shutdown of a pause-container pod do. Containers still listed
/// (their processes died with the VM) keep their entries until their
/// Delete, which then has nothing left to undo.
async fn stop_active(inner: &Inner, active: Active) {
    active.oom_watch.abort();
    if let Err(e) = active.sandbox.shutdown().await {
        tracing::error!(sandbox = %active.id, error = %e, "stopping the sandbox");
    }
    let bundles: Vec<PathBuf> = inner
        .containers()
        .values()
        .map(|c| c.bundle.clone())
        .collect();
    let report = cleanup::teardown(
        &active.paths,
        &bundles,
        &RealProcesses,
        KillTiming::default(),
    )
    .await;
    if !report.is_clean() {
        tracing::error!(sandbox = %active.id, errors = ?report.errors, "sandbox cleanup left trouble");
    }
}

pub(crate) async fn stop(
    inner: &Inner,
    req: api::StopSandboxRequest,
) -> Result<api::StopSandboxResponse> {
    let mut lifecycle = inner.lifecycle.lock().await;
    let pod = pod_of(inner, &req.sandbox_id)?;
    if let Some(active) = lifecycle.take() {
        tracing::info!(sandbox = %pod.id, "stopping the sandbox");
        stop_active(inner, active).await;
    }
    inner.pod_ended(ExitStatus::now(0));
    Ok(api::StopSandboxResponse::default())
}

pub(crate) async fn wait(
    inner: &Inner,
    req: api::WaitSandboxRequest,
) -> Result<api::WaitSandboxResponse> {
    pod_of(inner, &req.sandbox_id)?;
    let mut rx = inner.pod_exit.subscribe();
    let exit = match rx.wait_for(|e| e.is_some()).await {
        Ok(v) => *v,
        Err(_) => None,
    }
    .ok_or_else(|| Error::internal("the sandbox's exit was never recorded"))?;
    Ok(api::WaitSandboxResponse {
        exit_status: exit.status,
        exited_at: exit_timestamp(&exit),
        ..Default::default()
    })
}

pub(crate) async fn status(
    inner: &Inner,
    req: api::SandboxStatusRequest,
) -> Result<api::SandboxStatusResponse> {
    let pod = pod_of(inner, &req.sandbox_id)?;
    let vm_pid = inner
        .lifecycle
        .lock()
        .await
        .as_ref()
        .map(|a| a.sandbox.vm_pid());
    let (state, exited_at) = match pod.phase {
        Phase::Ready => ("SANDBOX_READY", MessageField::none()),
        Phase::Created => ("SANDBOX_NOTREADY", MessageField::none()),
        Phase::Stopped(e) => ("SANDBOX_NOTREADY", exit_timestamp(&e)),
    };
    let mut info = HashMap::new();
    if req.verbose {
        info.insert("shimPid".to_string(), std::process::id().to_string());
        info.insert("podPid".to_string(), pod.pid.to_string());
        if let Some(p) = vm_pid {
            info.insert("vmPid".to_string(), p.to_string());
        }
        info.insert(
            "stateDir".to_string(),
            SandboxPaths::new(&pod.config.state_dir, &pod.id)
                .dir
                .display()
                .to_string(),
        );
    }
    Ok(api::SandboxStatusResponse {
        sandbox_id: pod.id,
        pid: pod.pid,
        state: state.to_string(),
        info,
        created_at: timestamp(pod.started_at.unwrap_or(pod.created_at)),
        exited_at,
        ..Default::default()
    })
}

pub(crate) async fn ping(inner: &Inner, req: api::PingRequest) -> Result<api::PingResponse> {
    let pod = pod_of(inner, &req.sandbox_id)?;
    match pod.phase {
        Phase::Ready => Ok(api::PingResponse::default()),
        Phase::Created => Err(Error::precondition(format!(
            "sandbox {} is not started",
            pod.id
        ))),
        Phase::Stopped(e) => Err(Error::precondition(format!(
            "sandbox {} has stopped (status {})",
            pod.id, e.status
        ))),
    }
}

pub(crate) async fn shutdown(
    inner: &Inner,
    req: api::ShutdownSandboxRequest,
) -> Result<api::ShutdownSandboxResponse> {
    let mut lifecycle = inner.lifecycle.lock().await;
    let pod = pod_of(inner, &req.sandbox_id)?;
    if let Some(active) = lifecycle.take() {
        tracing::info!(sandbox = %pod.id, "stopping the sandbox before shutting down");
        stop_active(inner, active).await;
    }
    inner.pod_ended(ExitStatus::now(0));
    // Containers whose Delete never came: their processes went with the VM.
    let left: Vec<_> = inner.containers().drain().map(|(_, c)| c).collect();
    for c in left {
        tracing::warn!(container = %c.id, "container not deleted before ShutdownSandbox; dropping it");
        for e in c.execs() {
            e.close_io().await;
        }
        c.init.close_io().await;
    }
    tracing::info!(sandbox = %pod.id, "sandbox shut down; the shim exits");
    drop(lifecycle);
    inner.exit.signal();
    Ok(api::ShutdownSandboxResponse::default())
}

pub(crate) async fn metrics(
    inner: &Inner,
    req: api::SandboxMetricsRequest,
) -> Result<api::SandboxMetricsResponse> {
    let pod = pod_of(inner, &req.sandbox_id)?;
    if pod.phase != Phase::Ready {
        return Err(Error::precondition(format!(
            "sandbox {} is not running",
            pod.id
        )));
    }
    let containers: Vec<_> = inner.containers().values().cloned().collect();
    let mut sum = GuestStats {
        version: "v2".into(),
        ..Default::default()
    };
    for c in containers {
        let s = c
            .sandbox
            .guest()
            .stats(&c.id)
            .await
            .map_err(|e| e.context(format!("statistics of container {}", c.id)))?;
        add_stats(&mut sum, &s);
    }
    // containerd.types.Metric (the protos crate does not export its name).
    let mut resp = api::SandboxMetricsResponse::new();
    let metric = resp.metrics.mut_or_insert_default();
    metric.timestamp = timestamp(SystemTime::now());
    metric.id = pod.id;
    metric.data = MessageField::some(super::stats::to_any(&sum)?);
    Ok(resp)
}

/// Adds a container's usage to the pod's (limits are per container: the
/// pod's are left unset).
fn add_stats(sum: &mut GuestStats, s: &GuestStats) {
    let (a, b) = (&mut sum.cgroup, &s.cgroup);
    a.cpu_usage_usec += b.cpu_usage_usec;
    a.cpu_user_usec += b.cpu_user_usec;
    a.cpu_system_usec += b.cpu_system_usec;
    a.cpu_nr_throttled += b.cpu_nr_throttled;
    a.cpu_throttled_usec += b.cpu_throttled_usec;
    a.memory_usage_bytes += b.memory_usage_bytes;
    a.memory_max_usage_bytes += b.memory_max_usage_bytes;
    a.memory_cache_bytes += b.memory_cache_bytes;
    a.memory_rss_bytes += b.memory_rss_bytes;
    a.memory_swap_bytes += b.memory_swap_bytes;
    a.pids_current += b.pids_current;
    if !s.version.is_empty() {
        sum.version = s.version.clone();
    }
}

/// containerd's name of this machine's architecture (Go's GOARCH).
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[cfg(test)]
mod tests;
