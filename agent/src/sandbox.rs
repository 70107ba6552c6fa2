//! The sandbox: the guest's containers and storages, and the operations the
//! RPCs map to. Locks are std mutexes held only for map lookups; long work
//! (spawns, waits, reads) runs on `Arc<Container>`s outside them, so one
//! blocking RPC (WaitProcess, ReadStdout) never holds up another.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsule_agent_protocol::agent::{CreateContainerRequest, Device, Storage};
use protobuf::Message;

use crate::container::namespaces::{self, NamespacePlan, NsKind};
use crate::container::{self, cgroup::Cgroup, spec, Container, Prepared, Spawn};
use crate::device::{self, DeviceWatcher};
use crate::error::{AgentError, Result};
use crate::oom::OomWatcher;
use crate::paths::{secure_join, valid_id};
use crate::pod::PodPause;
use crate::reaper::Reaper;

/// How long devices of a CreateContainer/AddDevice may take to appear.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest device wait a request may ask for.
pub const MAX_DEVICE_TIMEOUT: Duration = Duration::from_secs(600);

/// The request's device wait: the default when unset, at most
/// [`MAX_DEVICE_TIMEOUT`].
pub fn device_timeout(req: &CreateContainerRequest) -> Duration {
    match req.device_timeout_ms {
        0 => DEVICE_TIMEOUT,
        ms => Duration::from_millis(ms.into()).min(MAX_DEVICE_TIMEOUT),
    }
}

enum Slot {
    Creating,
    Ready(Arc<Container>),
}

pub struct Sandbox {
    pub reaper: Arc<Reaper>,
    pub devices: Arc<DeviceWatcher>,
    /// OOM kills of the containers (GetOOMEvent).
    pub oom: Arc<OomWatcher>,
    containers: Mutex<HashMap<String, Slot>>,
    storages: tokio::sync::Mutex<Vec<PathBuf>>,
    /// The pod's namespaces, when the host asked for them (no pause
    /// container).
    pod: Mutex<Option<PodPause>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sandbox {
    pub fn new(reaper: Arc<Reaper>, devices: Arc<DeviceWatcher>, oom: Arc<OomWatcher>) -> Self {
        Self {
            reaper,
            devices,
            oom,
            containers: Mutex::new(HashMap::new()),
            storages: tokio::sync::Mutex::new(Vec::new()),
            pod: Mutex::new(None),
        }
    }

    pub fn container(&self, cid: &str) -> Result<Arc<Container>> {
        match lock(&self.containers).get(cid) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            Some(Slot::Creating) => Err(AgentError::FailedPrecondition(format!(
                "container {cid:?} is being created"
            ))),
            None => Err(AgentError::NotFound(format!("container {cid:?} not found"))),
        }
    }

    /// True when `cid` is a created container of this sandbox.
    fn is_ready(&self, cid: &str) -> bool {
        matches!(lock(&self.containers).get(cid), Some(Slot::Ready(_)))
    }

    /// True when the cgroup `group` (under `capsule/`) holds processes of
    /// this sandbox: a created container's, or the running pod pause's.
    fn is_sandbox_group(&self, group: &str) -> bool {
        if group == crate::pod::CGROUP_NAME {
            return lock(&self.pod).as_ref().is_some_and(PodPause::is_alive);
        }
        self.is_ready(group)
    }

    /// Sets the hostname, mounts the storages and, with `pod_namespaces`,
    /// starts the pod's pause process: returns its pid.
    pub async fn create_sandbox(
        &self,
        hostname: &str,
        storages: &[Storage],
        pod_namespaces: bool,
    ) -> Result<Option<i32>> {
        if pod_namespaces && lock(&self.pod).is_some() {
            return Err(AgentError::AlreadyExists(
                "the pod's namespaces exist already (CreateSandbox was sent twice)".into(),
            ));
        }
        if !hostname.is_empty() {
            nix::unistd::sethostname(hostname).map_err(|e| {
                AgentError::invalid(format!("sandbox hostname {hostname:?}: {}", e.desc()))
            })?;
        }
        let mounted = crate::storage::mount_all(&self.devices, storages).await?;
        self.storages.lock().await.extend(mounted);
        if !pod_namespaces {
            return Ok(None);
        }
        let pause = PodPause::start(&self.reaper)?;
        let pid = pause.pid;
        *lock(&self.pod) = Some(pause);
        Ok(Some(pid))
    }

    pub async fn destroy_sandbox(&self) -> Result<()> {
        let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        let mut errors = Vec::new();
        for id in ids {
            if let Err(e) = self.remove_container(&id, Duration::from_secs(10)).await {
                if e.code() != ttrpc::Code::NOT_FOUND {
                    errors.push(e.to_string());
                }
            }
        }
        let pause = lock(&self.pod).take();
        if let Some(p) = pause {
            if let Err(e) = p.stop().await {
                errors.push(e.to_string());
            }
        }
        let mut st = self.storages.lock().await;
        for p in st.drain(..).rev() {
            crate::storage::unmount(&p);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(AgentError::Internal(format!(
                "destroy sandbox: {}",
                errors.join("; ")
            )))
        }
    }

    pub async fn create_container(&self, req: CreateContainerRequest) -> Result<()> {
        let cid = req.container_id.clone();
        if !valid_id(&cid) {
            return Err(AgentError::invalid(format!(
                "container id {cid:?} is not valid"
            )));
        }
        {
            let mut map = lock(&self.containers);
            if map.contains_key(&cid) {
                return Err(AgentError::AlreadyExists(format!(
                    "container {cid:?} already exists"
                )));
            }
            map.insert(cid.clone(), Slot::Creating);
        }
        let r = self.create_inner(req).await;
        let mut map = lock(&self.containers);
        match r {
            Ok(c) => {
                map.insert(cid, Slot::Ready(Arc::new(c)));
                Ok(())
            }
            Err(e) => {
                map.remove(&cid);
                Err(e)
            }
        }
    }

    async fn create_inner(&self, req: CreateContainerRequest) -> Result<Container> {
        let cid = req.container_id.as_str();
        let what = format!("container {cid:?}");
        let mut oci = spec::parse_spec(cid, &req.oci_spec)?;
        let process = oci
            .process()
            .clone()
            .ok_or_else(|| AgentError::invalid(format!("{what}: spec has no process")))?;
        spec::check_process(&what, &process)?;
        spec::cap_sets(&what, &process)?;
        let ns = namespaces::plan(cid, &oci)?;
        for w in &ns.warnings {
            tracing::warn!(cid, "{w}");
        }
        namespaces::check_sysctls(cid, &oci, &ns)?;
        if let Some(profile) = oci.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
            let f = container::seccomp::compile(profile).map_err(|e| AgentError::Seccomp {
                what: what.clone(),
                source: e,
            })?;
            if !f.skipped.is_empty() {
                tracing::debug!(cid, skipped = ?f.skipped, "seccomp: syscalls this architecture does not have");
            }
        }
        spec::mount_plan(cid, oci.mounts().as_deref().unwrap_or(&[]))?;
        let prepared = device::prepare(&self.devices, &req.devices, device_timeout(&req))
            .await
            .map_err(|e| AgentError::device(&what, e))?;
        device::rewrite_spec(&mut oci, &prepared).map_err(|e| AgentError::device(&what, e))?;
        let devices = prepared
            .iter()
            .map(|p| {
                Ok(container::child::DeviceWire {
                    device: p
                        .device
                        .write_to_bytes()
                        .map_err(|e| AgentError::internal(&what, e))?,
                    guest_major: p.guest_major,
                    guest_minor: p.guest_minor,
                    guest_node: p.guest_node.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let device_nodes = prepared
            .iter()
            .map(|p| {
                let rel = container_rel(&what, &p.device.container_path)?;
                Ok((rel, p.device.id.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        let storages = crate::storage::mount_all(&self.devices, &req.storages)
            .await
            .map_err(|e| e.context(&what))?;
        let r = self
            .spawn_container(&req, oci, &ns, (devices, device_nodes), storages.clone())
            .await;
        if r.is_err() {
            for s in storages.iter().rev() {
                crate::storage::unmount(s);
            }
        }
        r
    }

    async fn spawn_container(
        &self,
        req: &CreateContainerRequest,
        oci: oci_spec::runtime::Spec,
        ns: &NamespacePlan,
        (devices, device_nodes): (Vec<container::child::DeviceWire>, Vec<(PathBuf, String)>),
        storages: Vec<PathBuf>,
    ) -> Result<Container> {
        let cid = req.container_id.as_str();
        // Opened now, after the slow parts (devices, storages): the process
        // named by a path must still be alive when the init joins it.
        let joins = namespaces::open_joins(cid, &ns.join, &|group| self.is_sandbox_group(group))?;
        let mut mounts: Vec<PathBuf> = self.storages.lock().await.clone();
        mounts.extend(storages.iter().cloned());
        let rootfs = spec::resolve_rootfs(cid, &req.rootfs, &mounts)?;
        if !rootfs.is_dir() {
            return Err(AgentError::invalid(format!(
                "container {cid:?}: rootfs {} is not a directory in the guest (is the share mounted?)",
                rootfs.display()
            )));
        }
        let cgroup = Cgroup::create(cid)?;
        if let Err(e) = self.oom.add(cid, &cgroup.dir) {
            tracing::warn!(cid, error = %e, "no OOM events for this container");
        }
        let resources = oci.linux().as_ref().and_then(|l| l.resources().clone());
        let r = async {
            if let Some(r) = &resources {
                cgroup.apply(cid, r)?;
            }
            let p = Prepared {
                id: cid.to_string(),
                spec: oci,
                rootfs,
                namespaces: ns.new,
                joins,
                set_hostname: ns.has(NsKind::Uts),
                devices,
                device_nodes,
                stdin: req.stdin,
                storages,
            };
            Container::create(
                Spawn {
                    reaper: &self.reaper,
                },
                p,
                cgroup.clone(),
            )
            .await
        }
        .await;
        if r.is_err() {
            self.oom.remove(cid);
            let _ = cgroup.remove(cid).await;
        }
        r
    }

    pub async fn remove_container(&self, cid: &str, timeout: Duration) -> Result<()> {
        let c = self.container(cid)?;
        c.destroy(timeout, &self.oom).await?;
        lock(&self.containers).remove(cid);
        Ok(())
    }

    /// AddDevice: waits for the device and creates its node in the running
    /// container (through /proc/<init>/root). Returns guest major:minor.
    /// A path that already holds a device the agent made (by CreateContainer
    /// or an earlier AddDevice) is refused, naming both devices.
    pub async fn add_device(&self, cid: &str, d: Device) -> Result<(u32, u32)> {
        let c = self.container(cid)?;
        let what = format!(
            "container {cid:?} device {:?} at {:?}",
            d.id, d.container_path
        );
        if c.is_stopped() {
            return Err(AgentError::FailedPrecondition(format!(
                "{what}: the container is stopped"
            )));
        }
        let rel = container_rel(&what, &d.container_path)?;
        {
            // Reserved now, so a concurrent AddDevice for the path is refused
            // while this one waits for its device.
            let mut devs = container::lock(&c.device_nodes);
            if let Some((_, other)) = devs.iter().find(|(p, _)| *p == rel) {
                return Err(AgentError::AlreadyExists(format!(
                    "{what}: the path already holds device {other:?}"
                )));
            }
            devs.push((rel.clone(), d.id.clone()));
        }
        let r = async {
            let root = c.proc_root();
            check_no_symlinks(&what, &root, &rel)?;
            let prepared = device::prepare(&self.devices, std::slice::from_ref(&d), DEVICE_TIMEOUT)
                .await
                .map_err(|e| AgentError::device(&what, e))?;
            device::create_nodes(&root, &prepared).map_err(|e| AgentError::device(&what, e))?;
            let p = prepared
                .first()
                .ok_or_else(|| AgentError::Internal(format!("{what}: nothing prepared")))?;
            Ok((p.guest_major, p.guest_minor))
        }
        .await;
        if r.is_err() {
            container::lock(&c.device_nodes).retain(|(p, id)| !(*p == rel && *id == d.id));
        }
        r
    }

    /// RemoveDevice: removes the node of a device the agent made at
    /// `container_path` (by CreateContainer or AddDevice).
    pub async fn remove_device(&self, cid: &str, container_path: &str) -> Result<()> {
        let c = self.container(cid)?;
        let what = format!("container {cid:?} device at {container_path:?}");
        let rel = container_rel(&what, container_path)?;
        if !container::lock(&c.device_nodes)
            .iter()
            .any(|(p, _)| *p == rel)
        {
            return Err(AgentError::NotFound(format!(
                "{what}: no device was given to the container there"
            )));
        }
        let root = c.proc_root();
        check_no_symlinks(&what, &root, &rel)?;
        match std::fs::remove_file(root.join(&rel)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(crate::error::io_err(format!("{what}: remove node"), e)),
        }
        container::lock(&c.device_nodes).retain(|(p, _)| *p != rel);
        Ok(())
    }
}

fn container_rel(what: &str, path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !crate::paths::is_clean_absolute(p) || p == Path::new("/") {
        return Err(AgentError::invalid(format!(
            "{what}: container path must be absolute, without '..'"
        )));
    }
    Ok(p.strip_prefix("/")
        .map(Path::to_path_buf)
        .unwrap_or_default())
}

/// Refuses a path whose directories are symlinks inside the container: from
/// the agent, an absolute link would resolve against the guest's root.
fn check_no_symlinks(what: &str, root: &Path, rel: &Path) -> Result<()> {
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    let resolved =
        secure_join(root, parent).map_err(|e| AgentError::invalid(format!("{what}: {e}")))?;
    if resolved != root.join(parent) {
        return Err(AgentError::invalid(format!(
            "{what}: the path goes through a symlink in the container"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_timeout_defaults_and_is_capped() {
        let mut req = CreateContainerRequest::new();
        assert_eq!(device_timeout(&req), DEVICE_TIMEOUT);
        req.device_timeout_ms = 1500;
        assert_eq!(device_timeout(&req), Duration::from_millis(1500));
        req.device_timeout_ms = u32::MAX;
        assert_eq!(device_timeout(&req), MAX_DEVICE_TIMEOUT);
    }
}
