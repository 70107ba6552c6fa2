//! Containers on the agent side: create (spawn the `init-container` child and
//! wait until its root is ready), start, exec, signal, wait, pause, update,
//! stats, remove. The child side is in [`child`] and [`rootfs`].
pub mod cgroup;
pub mod child;
mod launch;
pub mod namespaces;
pub mod privileged;
pub mod rootfs;
pub mod seccomp;
pub mod spec;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_spec::runtime::Spec;
use tokio::io::BufReader;
use tokio::net::unix::pipe;

use self::cgroup::Cgroup;
use self::child::{ExecConfig, Status};
use self::launch::{cgroup_fd, child_fds, config_fd, next_status, pipe_pair, stdio_for};
use crate::error::{io_err, AgentError, Result};
use crate::process::ProcessEntry;
use crate::reaper::Reaper;
use crate::spawn::{self_exe, SpawnSpec};

/// How long the init may take to build the rootfs.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the exec of the process may take after the start byte.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
}

/// The agent's ends of the init's start and status pipes until it starts.
struct StartHandle {
    start: File,
    status: BufReader<pipe::Receiver>,
}

pub struct Container {
    pub id: String,
    pub spec: Spec,
    pub rootfs: PathBuf,
    pub cgroup: Cgroup,
    pub init: Arc<ProcessEntry>,
    /// exec id -> process; `None` while the exec is being started.
    execs: Mutex<HashMap<String, Option<Arc<ProcessEntry>>>>,
    state: Mutex<State>,
    start: tokio::sync::Mutex<Option<StartHandle>>,
    /// Container-level storages this container mounted (unmounted on remove).
    pub storages: Vec<PathBuf>,
    /// The device nodes the agent made (CreateContainer devices, then
    /// AddDevice): path relative to the container root, and device id.
    /// AddDevice refuses a path already here; RemoveDevice takes one out.
    pub device_nodes: Mutex<Vec<(PathBuf, String)>>,
}

/// What the child-spawning helpers need.
pub struct Spawn<'a> {
    pub reaper: &'a Arc<Reaper>,
}

/// Everything CreateContainer resolved before the spawn.
pub struct Prepared {
    pub id: String,
    pub spec: Spec,
    pub rootfs: PathBuf,
    /// `CLONE_NEW*` flags of the namespaces to create.
    pub namespaces: u64,
    /// Namespaces to join (the pod's), opened and checked.
    pub joins: Vec<namespaces::OpenedNs>,
    /// The container has a uts namespace (its own or the pod's), so its
    /// hostname is set.
    pub set_hostname: bool,
    pub devices: Vec<child::DeviceWire>,
    /// [`Container::device_nodes`] of the `devices`.
    pub device_nodes: Vec<(PathBuf, String)>,
    pub stdin: bool,
    pub storages: Vec<PathBuf>,
}

/// The result of a cleanup SIGKILL: a process already gone is fine, any
/// other failure is logged (the cleanup goes on).
fn cleanup_kill(what: &str, r: std::io::Result<()>) {
    match r {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
        Err(e) => tracing::warn!(error = %e, "{what}: SIGKILL during cleanup failed"),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Container {
    /// Spawns the init child and waits until its rootfs is ready (or failed).
    pub async fn create(sp: Spawn<'_>, p: Prepared, cgroup: Cgroup) -> Result<Self> {
        let what = format!("container {:?}", p.id);
        let process = p
            .spec
            .process()
            .clone()
            .ok_or_else(|| AgentError::invalid(format!("{what}: spec has no process")))?;
        let terminal = process.terminal().unwrap_or(false);
        let size = process
            .console_size()
            .map(|b| (b.height() as u16, b.width() as u16));
        let (child_io, io) = stdio_for(&what, terminal, p.stdin)?;
        let cfg = child::InitConfig {
            cid: p.id.clone(),
            spec: p.spec.clone(),
            rootfs: p.rootfs.clone(),
            devices: p.devices,
            terminal,
            set_hostname: p.set_hostname,
            guest_devices: privileged::is_privileged(&p.spec),
        };
        let json = serde_json::to_vec(&cfg).map_err(|e| AgentError::internal(&what, e))?;
        let config = config_fd(&what, &json)?;
        let (start_r, start_w) = pipe_pair(&what)?;
        let (status_r, status_w) = pipe_pair(&what)?;
        let cg = cgroup_fd(&what, &cgroup)?;
        let argv = crate::spawn::cstrings(&what, &["capsule-init", "init-container"])
            .map_err(AgentError::Internal)?;
        let new = p.namespaces;
        let cid = p.id.clone();
        let (spawned, exit) =
            launch::spawn_on_thread(sp.reaper, &what, p.joins, move |reaper, joins| {
                // The pod's namespaces first (setns on this thread: pid sets the
                // namespace of the init, the others are inherited by it), then
                // the new ones in the clone.
                namespaces::join_on_this_thread(&cid, &joins)?;
                let spec = SpawnSpec {
                    program: self_exe(),
                    argv,
                    envp: Vec::new(),
                    fds: child_fds(&child_io, &config, Some(&start_r), &status_w),
                    namespaces: new,
                    cgroup: Some(cg.as_fd()),
                };
                reaper
                    .spawn(&spec)
                    .map_err(|e| io_err(format!("container {cid:?}: spawn init"), e))
            })
            .await?;
        let status = pipe::Receiver::from_owned_fd(status_r)
            .map_err(|e| io_err(format!("{what}: status pipe"), e))?;
        let mut status = BufReader::new(status);
        let mut exit = exit;
        let stdio = match io.finish(&what, p.stdin, size, &mut status).await {
            Ok(s) => s,
            Err(e) => {
                cleanup_kill(
                    &what,
                    crate::spawn::pidfd_signal(&spawned.pidfd, libc::SIGKILL),
                );
                crate::reaper::wait_exit(&mut exit).await;
                return Err(e);
            }
        };
        let init = Arc::new(ProcessEntry::new(
            String::new(),
            spawned.pid,
            spawned.pidfd,
            exit,
            stdio,
        ));
        let ready = next_status(&what, &mut status, SETUP_TIMEOUT).await;
        match ready {
            Ok(Some(Status::Ready)) => {}
            other => {
                cleanup_kill(&what, init.signal(libc::SIGKILL));
                let exit = init.wait().await;
                return Err(match other {
                    Err(e) => e,
                    _ => AgentError::Internal(format!(
                        "{what}: init exited during setup (status {})",
                        exit.status
                    )),
                });
            }
        }
        Ok(Self {
            id: p.id,
            spec: p.spec,
            rootfs: p.rootfs,
            cgroup,
            init,
            execs: Mutex::new(HashMap::new()),
            state: Mutex::new(State::Created),
            start: tokio::sync::Mutex::new(Some(StartHandle {
                start: File::from(start_w),
                status,
            })),
            storages: p.storages,
            device_nodes: Mutex::new(p.device_nodes),
        })
    }

    fn what(&self) -> String {
        format!("container {:?}", self.id)
    }

    pub fn state(&self) -> State {
        *lock(&self.state)
    }

    pub fn is_stopped(&self) -> bool {
        self.init.exited().is_some()
    }

    /// Lets the init exec the container process; returns its pid.
    pub async fn start(&self) -> Result<u32> {
        let what = self.what();
        let mut g = self.start.lock().await;
        let Some(mut h) = g.take() else {
            return Err(AgentError::FailedPrecondition(format!(
                "{what}: already started"
            )));
        };
        if self.is_stopped() {
            return Err(AgentError::FailedPrecondition(format!(
                "{what}: init exited before start"
            )));
        }
        h.start
            .write_all(&[1])
            .map_err(|e| io_err(format!("{what}: start pipe"), e))?;
        drop(h.start);
        // EOF: the status fd closed on exec, the process runs.
        match next_status(&what, &mut h.status, START_TIMEOUT).await? {
            None => {}
            Some(s) => {
                return Err(AgentError::Internal(format!(
                    "{what}: unexpected status {s:?} at start"
                )))
            }
        }
        *lock(&self.state) = State::Running;
        Ok(self.init.pid as u32)
    }

    /// The init (empty exec id) or an exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<ProcessEntry>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .flatten()
            .ok_or_else(|| {
                AgentError::NotFound(format!("{}: exec {exec_id:?} not found", self.what()))
            })
    }

    /// Starts an extra process in the container's namespaces and cgroup.
    pub async fn exec(
        &self,
        sp: Spawn<'_>,
        exec_id: &str,
        process: oci_spec::runtime::Process,
        stdin: bool,
    ) -> Result<u32> {
        let what = format!("{} exec {exec_id:?}", self.what());
        match self.state() {
            _ if self.is_stopped() => {
                return Err(AgentError::FailedPrecondition(format!(
                    "{what}: the container has stopped"
                )))
            }
            State::Created => {
                return Err(AgentError::FailedPrecondition(format!(
                    "{what}: the container is not started"
                )))
            }
            State::Paused => {
                return Err(AgentError::FailedPrecondition(format!(
                    "{what}: the container is paused"
                )))
            }
            State::Running => {}
        }
        {
            let mut execs = lock(&self.execs);
            if execs.contains_key(exec_id) {
                return Err(AgentError::AlreadyExists(format!(
                    "{what}: exec id already in use"
                )));
            }
            execs.insert(exec_id.to_string(), None);
        }
        let r = self.exec_inner(sp, &what, exec_id, process, stdin).await;
        let mut execs = lock(&self.execs);
        match r {
            Ok(entry) => {
                let pid = entry.pid as u32;
                execs.insert(exec_id.to_string(), Some(entry));
                Ok(pid)
            }
            Err(e) => {
                execs.remove(exec_id);
                Err(e)
            }
        }
    }

    async fn exec_inner(
        &self,
        sp: Spawn<'_>,
        what: &str,
        exec_id: &str,
        process: oci_spec::runtime::Process,
        stdin: bool,
    ) -> Result<Arc<ProcessEntry>> {
        let terminal = process.terminal().unwrap_or(false);
        let size = process
            .console_size()
            .map(|b| (b.height() as u16, b.width() as u16));
        let (io_child, io) = stdio_for(what, terminal, stdin)?;
        let cfg = ExecConfig {
            cid: self.id.clone(),
            exec_id: exec_id.to_string(),
            init_pid: self.init.pid,
            process,
            terminal,
            seccomp: self.spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
        };
        let json = serde_json::to_vec(&cfg).map_err(|e| AgentError::internal(what, e))?;
        let config = config_fd(what, &json)?;
        let (status_r, status_w) = pipe_pair(what)?;
        let cg = cgroup_fd(what, &self.cgroup)?;
        let pidns = File::open(format!("/proc/{}/ns/pid", self.init.pid))
            .map_err(|e| io_err(format!("{what}: open the container's pid namespace"), e))?;
        let argv = crate::spawn::cstrings(what, &["capsule-exec", "exec-enter"])
            .map_err(AgentError::Internal)?;
        let cid = self.id.clone();
        let w = what.to_string();
        let joins = vec![namespaces::OpenedNs {
            kind: namespaces::NsKind::Pid,
            file: pidns,
        }];
        // The other namespaces and the root are joined by the process
        // itself (exec-enter), single-threaded.
        let (spawned, exit) =
            launch::spawn_on_thread(sp.reaper, what, joins, move |reaper, joins| {
                namespaces::join_on_this_thread(&cid, &joins)?;
                let spec = SpawnSpec {
                    program: self_exe(),
                    argv,
                    envp: Vec::new(),
                    fds: child_fds(&io_child, &config, None, &status_w),
                    namespaces: 0,
                    cgroup: Some(cg.as_fd()),
                };
                reaper
                    .spawn(&spec)
                    .map_err(|e| io_err(format!("{w}: spawn"), e))
            })
            .await?;
        let status = pipe::Receiver::from_owned_fd(status_r)
            .map_err(|e| io_err(format!("{what}: status pipe"), e))?;
        let mut status = BufReader::new(status);
        let stdio = match io.finish(what, stdin, size, &mut status).await {
            Ok(s) => s,
            Err(e) => {
                cleanup_kill(
                    what,
                    crate::spawn::pidfd_signal(&spawned.pidfd, libc::SIGKILL),
                );
                return Err(e);
            }
        };
        let entry = Arc::new(ProcessEntry::new(
            exec_id.to_string(),
            spawned.pid,
            spawned.pidfd,
            exit,
            stdio,
        ));
        match next_status(what, &mut status, SETUP_TIMEOUT).await {
            Ok(None) => Ok(entry),
            Ok(Some(s)) => {
                cleanup_kill(what, entry.signal(libc::SIGKILL));
                Err(AgentError::Internal(format!(
                    "{what}: unexpected status {s:?}"
                )))
            }
            Err(e) => {
                cleanup_kill(what, entry.signal(libc::SIGKILL));
                Err(e)
            }
        }
    }

    /// Drops an exec whose exit was reported and whose output is drained.
    pub async fn forget_exec_if_done(&self, exec_id: &str) {
        if exec_id.is_empty() {
            return;
        }
        let Ok(p) = self.process(exec_id) else { return };
        if p.exit_reported() && p.stdio.drained().await {
            lock(&self.execs).remove(exec_id);
        }
    }

    /// Pids of the container and the exec id each belongs to ("" = other).
    pub fn processes(&self) -> Vec<(i32, String)> {
        let execs: HashMap<i32, String> = lock(&self.execs)
            .iter()
            .filter_map(|(id, e)| e.as_ref().map(|e| (e.pid, id.clone())))
            .collect();
        self.cgroup
            .procs()
            .into_iter()
            .map(|pid| (pid, execs.get(&pid).cloned().unwrap_or_default()))
            .collect()
    }

    /// The signal that has the effect `sig` asks for on process `pid`:
    /// SIGKILL when `pid` is the init of its pid namespace and would drop
    /// `sig` (see [`crate::signals`]).
    fn effective_signal(&self, pid: i32, sig: i32) -> i32 {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return sig;
        };
        let Some(state) = crate::signals::parse_status(&status) else {
            tracing::warn!(cid = %self.id, pid, "unreadable /proc/{pid}/status; signal sent as is");
            return sig;
        };
        let eff = crate::signals::effective_signal(sig, &state);
        if eff != sig {
            tracing::info!(
                cid = %self.id,
                pid,
                signal = sig,
                "the process is the init of its pid namespace and does not handle the signal, which the kernel would drop: sending SIGKILL"
            );
        }
        eff
    }

    /// Signals the init process (through its pidfd).
    pub fn signal_init(&self, sig: i32) -> std::io::Result<()> {
        if self.init.exited().is_some() {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        self.init.signal(self.effective_signal(self.init.pid, sig))
    }

    pub fn signal_all(&self, sig: i32) -> Result<()> {
        if sig == libc::SIGKILL {
            self.cgroup.kill_all();
            return Ok(());
        }
        for pid in self.cgroup.procs() {
            let sig = if pid == self.init.pid {
                self.effective_signal(pid, sig)
            } else {
                sig
            };
            match nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::try_from(sig).ok(),
            ) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    return Err(crate::error::sys_err(
                        format!("{}: signal {sig} to pid {pid}", self.what()),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    pub async fn pause(&self) -> Result<()> {
        if self.is_stopped() || self.state() != State::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "{}: not running",
                self.what()
            )));
        }
        self.cgroup.set_frozen(&self.id, true).await?;
        *lock(&self.state) = State::Paused;
        Ok(())
    }

    pub async fn resume(&self) -> Result<()> {
        if self.state() != State::Paused {
            return Err(AgentError::FailedPrecondition(format!(
                "{}: not paused",
                self.what()
            )));
        }
        self.cgroup.set_frozen(&self.id, false).await?;
        *lock(&self.state) = State::Running;
        Ok(())
    }

    /// Kills everything, waits up to `timeout` for the init, takes the
    /// container out of the OOM watcher (a last look at its counter) and
    /// removes the cgroup.
    pub async fn destroy(&self, timeout: Duration, oom: &crate::oom::OomWatcher) -> Result<()> {
        let what = self.what();
        // Abort a created-but-not-started init.
        drop(self.start.lock().await.take());
        self.cgroup.kill_all();
        cleanup_kill(&what, self.init.signal(libc::SIGKILL));
        if self.state() == State::Paused {
            if let Err(e) = self.cgroup.set_frozen(&self.id, false).await {
                tracing::warn!(error = %e, "{what}: thaw before removal failed");
            }
        }
        if tokio::time::timeout(timeout, self.init.wait())
            .await
            .is_err()
        {
            return Err(AgentError::DeadlineExceeded(format!(
                "{what}: init did not exit within {timeout:?} after SIGKILL"
            )));
        }
        // The pid namespace is gone with its init; stray processes of a
        // container without one are killed above. Wait for the cgroup to empty.
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.cgroup.procs().is_empty() && tokio::time::Instant::now() < deadline {
            self.cgroup.kill_all();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        oom.remove(&self.id);
        self.cgroup.remove(&self.id).await?;
        for s in self.storages.iter().rev() {
            crate::storage::unmount(s);
        }
        Ok(())
    }

    /// The container's root as the agent can reach it (through procfs).
    pub fn proc_root(&self) -> PathBuf {
        Path::new("/proc")
            .join(self.init.pid.to_string())
            .join("root")
    }
}
