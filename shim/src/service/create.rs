//! Create: from a bundle to a created container in the guest, undoing
//! everything this Create did when a step fails.
//!
//! Steps (each recorded in `sandbox.json` or, for devices, `devices.json`
//! as it completes): resolve the container's devices on the host (once) →
//! open the host stdio → record the container (`creating`) → start the
//! sandbox (the first container only) → mount and share the rootfs →
//! attach the devices → CreateContainer in the guest → `created`.
//! TaskCreate is published only after the last step.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use capsule_agent_protocol::agent;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{TaskCreate, TaskIO};
use oci_spec::runtime::Spec;

use super::process::{Container, Process};
use super::{options, sandbox_id_of, Active, ConfigSource, Inner};
use crate::cleanup::{self, KillTiming, RealProcesses};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::TaskEvent;
use crate::fault;
use crate::io::{HostIo, IoContext, StdioConfig};
use crate::mount::RootfsMount;
use crate::sandbox::{agent_devices, share, ContainerRequest, Sandbox};
use crate::state::{
    self, BundleRecord, ContainerRecord, ContainerStatus, ProcRef, SandboxPaths, SandboxStore,
};

pub fn load_spec(bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path)
        .map_err(|e| crate::error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(format!("{}: not a valid OCI spec: {e}", path.display())))
}

/// The configuration of a new sandbox: the runtime options' config path
/// (`options`), then `$CAPSULE_CONFIG`, then the default file.
pub(super) fn load_config(
    inner: &Inner,
    options: Option<&containerd_shim_protos::protobuf::well_known_types::any::Any>,
) -> Result<(Config, Option<PathBuf>)> {
    match &inner.config_source {
        ConfigSource::Fixed(c) => Ok(((**c).clone(), None)),
        ConfigSource::Load => {
            let explicit = options.and_then(options::config_path);
            let (c, source) = Config::load(explicit.as_deref())?;
            crate::logging::set_level(&c.log_level);
            tracing::info!(config = %source, "configuration loaded");
            let path = match source {
                crate::config::Source::File(p) => Some(p),
                crate::config::Source::Defaults => None,
            };
            Ok((c, path))
        }
    }
}

/// Opens a new sandbox's record in `paths` naming this shim (its pid and
/// address); on error nothing is left of the directory.
pub(super) fn open_store(
    inner: &Inner,
    paths: &SandboxPaths,
    sandbox_id: &str,
) -> Result<Arc<SandboxStore>> {
    let store = Arc::new(SandboxStore::open(paths, sandbox_id)?);
    let address = inner.shim_address.clone();
    if let Err(e) = store.update(|r| {
        r.shim = ProcRef::current();
        r.shim_address = Some(address);
    }) {
        let _ = std::fs::remove_dir_all(&paths.dir);
        return Err(e);
    }
    Ok(store)
}

/// Refuses a container of `sandbox_id` when the Sandbox API made this
/// shim's sandbox and it is another, or not running.
fn check_pod(inner: &Inner, id: &str, sandbox_id: &str) -> Result<()> {
    let pod = inner.pod();
    let Some(p) = pod.as_ref() else {
        return Ok(());
    };
    if p.id != sandbox_id {
        return Err(Error::precondition(format!(
            "container {id} belongs to sandbox {sandbox_id}, but this shim serves sandbox {}",
            p.id
        )));
    }
    match p.phase {
        super::sandbox_api::Phase::Ready => Ok(()),
        super::sandbox_api::Phase::Created => Err(Error::precondition(format!(
            "container {id}: sandbox {sandbox_id} is not started (StartSandbox)"
        ))),
        super::sandbox_api::Phase::Stopped(_) => Err(Error::precondition(format!(
            "container {id}: sandbox {sandbox_id} has stopped"
        ))),
    }
}

/// What to undo, in reverse order.
enum Undo {
    Rootfs(Arc<dyn Sandbox>, String, PathBuf),
    Devices(Arc<dyn Sandbox>, String),
    Container(Arc<dyn Sandbox>, String),
}

async fn rollback(undo: Vec<Undo>) -> Vec<String> {
    let mut trouble = Vec::new();
    for u in undo.into_iter().rev() {
        let r = match &u {
            Undo::Container(sb, cid) => sb.guest().remove_container(cid).await,
            Undo::Devices(sb, cid) => sb.detach_devices(cid).await,
            Undo::Rootfs(sb, cid, bundle) => sb.release_rootfs(cid, bundle).await,
        };
        if let Err(e) = r {
            trouble.push(e.to_string());
        }
    }
    trouble
}

pub async fn create(inner: &Inner, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
    let id = req.id.clone();
    state::check_id("container id", &id)?;
    if !req.checkpoint.is_empty() {
        return Err(Error::unimplemented(
            "restoring a container from a checkpoint is not supported",
        ));
    }
    let bundle = PathBuf::from(&req.bundle);
    let spec = load_spec(&bundle)?;
    let sandbox_id = sandbox_id_of(&id, &spec);
    state::check_id("sandbox id", &sandbox_id)?;

    let mut lifecycle = inner.lifecycle.lock().await;
    if inner.containers().contains_key(&id) {
        return Err(Error::exists(format!("container {id} already exists")));
    }
    check_pod(inner, &id, &sandbox_id)?;
    let (config, config_path) = match lifecycle.as_ref() {
        Some(a) if a.id != sandbox_id => {
            return Err(Error::precondition(format!(
                "container {id} belongs to sandbox {sandbox_id}, but this shim serves sandbox {}",
                a.id
            )))
        }
        Some(a) => (a.config.clone(), a.config_path.clone()),
        None => load_config(inner, req.options.as_ref())?,
    };
    let paths = SandboxPaths::new(&config.state_dir, &sandbox_id);
    crate::sandbox::host_share::refuse_host_sharing(&spec)
        .map_err(|e| e.context(format!("container {id}")))?;
    // The one resolution of the container's devices, before anything
    // starts: a bad device fails here, and the attach reuses this.
    let resolved = inner
        .factory
        .resolve_devices(&config, &spec)
        .map_err(|e| e.context(format!("container {id}")))?;

    let stdio = StdioConfig {
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
        terminal: req.terminal,
    };
    let host_io = HostIo::open(
        &stdio,
        &IoContext {
            container_id: id.clone(),
            namespace: inner.namespace.clone(),
        },
    )
    .await
    .map_err(|e| e.context(format!("container {id}: stdio")))?;

    state::save(
        &bundle.join(state::BUNDLE_FILE),
        &BundleRecord {
            version: state::STATE_VERSION,
            container_id: id.clone(),
            sandbox_id: sandbox_id.clone(),
            state_dir: config.state_dir.clone(),
            config_path: config_path.clone(),
        },
    )?;

    let new_sandbox = lifecycle.is_none();
    let store = match lifecycle.as_ref() {
        Some(a) => a.store.clone(),
        None => open_store(inner, &paths, &sandbox_id)?,
    };
    let mut rec = ContainerRecord {
        id: id.clone(),
        bundle: bundle.clone(),
        status: ContainerStatus::Creating,
        rootfs_mounted: false,
        share_mounts: Vec::new(),
    };
    if let Err(e) = store.put_container(&rec) {
        if new_sandbox {
            let _ = std::fs::remove_dir_all(&paths.dir);
        }
        return Err(e);
    }
    fault::point("create.recorded");

    let rootfs_mounts: Vec<RootfsMount> = req
        .rootfs
        .iter()
        .map(|m| RootfsMount {
            fs_type: m.type_.clone(),
            source: m.source.clone(),
            options: m.options.clone(),
        })
        .collect();
    let creq = ContainerRequest {
        id: id.clone(),
        bundle: bundle.clone(),
        rootfs: rootfs_mounts,
        spec,
    };

    let mut undo: Vec<Undo> = Vec::new();
    let mut started: Option<Arc<dyn Sandbox>> = None;
    let result = async {
        let sb: Arc<dyn Sandbox> = match lifecycle.as_ref() {
            Some(a) => a.sandbox.clone(),
            None => {
                let setup = crate::sandbox::SandboxSetup::from_spec(&creq.spec)?;
                let sb = inner
                    .factory
                    .create(&sandbox_id, &config, store.clone(), &setup)
                    .await?;
                started = Some(sb.clone());
                fault::point("create.sandbox-started");
                sb
            }
        };
        let shared = sb.prepare_rootfs(&creq).await?;
        undo.push(Undo::Rootfs(sb.clone(), id.clone(), bundle.clone()));
        rec.rootfs_mounted = shared.rootfs_mounted;
        rec.share_mounts = shared.share_mounts.clone();
        store.put_container(&rec)?;
        fault::point("create.rootfs-shared");

        // Recorded, with their owner, in devices.json as they attach.
        undo.push(Undo::Devices(sb.clone(), id.clone()));
        let devices = sb.attach_devices(&id, resolved).await?;
        fault::point("create.devices-attached");

        let areq = agent::CreateContainerRequest {
            container_id: id.clone(),
            oci_spec: share::spec_json(&shared.spec)?,
            rootfs: shared.guest_rootfs.clone(),
            devices: agent_devices(&devices)?,
            stdin: stdio.has_stdin(),
            ..Default::default()
        };
        sb.guest()
            .create_container(areq)
            .await
            .map_err(|e| e.context(format!("creating container {id} in the guest")))?;
        undo.push(Undo::Container(sb.clone(), id.clone()));
        rec.status = ContainerStatus::Created;
        store.put_container(&rec)?;
        fault::point("create.container-created");
        Ok::<_, Error>(sb)
    }
    .await;

    let sb = match result {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(container = %id, error = %e, "create failed; rolling back");
            let mut trouble = rollback(undo).await;
            if let Some(sb) = started {
                if let Err(s) = sb.shutdown().await {
                    trouble.push(s.to_string());
                }
            }
            if new_sandbox {
                let report = cleanup::teardown(
                    &paths,
                    std::slice::from_ref(&bundle),
                    &RealProcesses,
                    KillTiming::default(),
                )
                .await;
                trouble.extend(report.errors);
            } else if let Err(s) = store.remove_container(&id) {
                trouble.push(s.to_string());
            }
            let _ = std::fs::remove_file(bundle.join(state::BUNDLE_FILE));
            return Err(if trouble.is_empty() {
                e
            } else {
                e.note(format!("rollback trouble: {}", trouble.join("; ")))
            });
        }
    };

    let pid = sb.vm_pid();
    let oom = match lifecycle.as_ref() {
        Some(a) => a.oom.clone(),
        None => super::oom::OomEvents::new(sb.clone(), inner.events.clone()),
    };
    let init = Process::new(&id, "", stdio.clone(), None, host_io, pid);
    let container = Arc::new(Container {
        id: id.clone(),
        bundle: bundle.clone(),
        rootfs: req.rootfs.clone(),
        sandbox: sb.clone(),
        init,
        execs: Mutex::new(Default::default()),
        record: Mutex::new(rec),
        store: store.clone(),
        oom: oom.clone(),
    });
    inner.containers().insert(id.clone(), container);
    if lifecycle.is_none() {
        let oom_watch = tokio::spawn(oom.clone().watch()).abort_handle();
        *lifecycle = Some(Active {
            id: sandbox_id,
            sandbox: sb,
            config,
            config_path,
            paths,
            store,
            oom,
            oom_watch,
        });
    }
    drop(lifecycle);

    inner
        .events
        .publish(TaskEvent::Create(TaskCreate {
            container_id: id,
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: stdio.stdin,
                stdout: stdio.stdout,
                stderr: stdio.stderr,
                terminal: stdio.terminal,
                ..Default::default()
            })
            .into(),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        }))
        .await;
    fault::point("create.before-reply");
    Ok(api::CreateTaskResponse {
        pid,
        ..Default::default()
    })
}
