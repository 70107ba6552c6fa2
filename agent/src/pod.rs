//! The pod's namespaces when there is no pause container (containerd's
//! Sandbox API, `sandboxer = "shim"`).
//!
//! CRI puts every container of a pod into the pid, ipc and uts namespaces of
//! one process, `/proc/<sandbox pid>/ns/<type>`; with a pause container that
//! process is the pause container's init. Without one, the agent keeps a
//! process of its own for the pod: [`PodPause`], the agent binary re-executed
//! as `pod-pause` ([`pause_main`]) in new pid, ipc and uts namespaces (it is
//! PID 1 of the pod's pid namespace and reaps the orphans there, as the pause
//! container does), born in the cgroup `capsule/.pod`. That cgroup name
//! cannot be a container id (ids never start with a dot), and the namespace
//! checks of `container::namespaces::open_joins` accept it as "a process of
//! this sandbox" only while the pause runs.
//!
//! Its hostname is the VM's (set by CreateSandbox before it is spawned: a new
//! uts namespace starts as a copy). It lives until DestroySandbox or the VM's
//! end; when it dies, the kernel kills every process of the pod's pid
//! namespace.
use std::convert::Infallible;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::container::cgroup::Cgroup;
use crate::error::{io_err, AgentError, Result};
use crate::reaper::{wait_exit, ExitRx, Reaper};
use crate::spawn::{cstrings, pidfd_signal, self_exe, SpawnSpec};

/// The pause's cgroup under `capsule/` (never a valid container id).
pub const CGROUP_NAME: &str = ".pod";

/// The subcommand the agent binary runs as the pause.
pub const SUBCOMMAND: &str = "pod-pause";

/// The pod's pause process.
pub struct PodPause {
    /// Its pid in the guest (the agent's pid namespace).
    pub pid: i32,
    pidfd: OwnedFd,
    exit: ExitRx,
    cgroup: Cgroup,
}

impl PodPause {
    /// Spawns the pause in new pid, ipc and uts namespaces.
    pub fn start(reaper: &Arc<Reaper>) -> Result<Self> {
        let what = "the pod's pause process";
        let cgroup = Cgroup::create(CGROUP_NAME)?;
        let cg: OwnedFd = File::open(&cgroup.dir)
            .map_err(|e| io_err(format!("{what}: open cgroup {}", cgroup.dir.display()), e))?
            .into();
        let null: OwnedFd = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| io_err(format!("{what}: open /dev/null"), e))?
            .into();
        let argv = cstrings(what, &["capsule-pod", SUBCOMMAND]).map_err(AgentError::Internal)?;
        let namespaces =
            (CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS).bits()
                as u64;
        let spec = SpawnSpec {
            program: self_exe(),
            argv,
            envp: Vec::new(),
            fds: vec![(null.as_fd(), 0), (null.as_fd(), 1), (null.as_fd(), 2)],
            namespaces,
            cgroup: Some(cg.as_fd()),
        };
        let (spawned, exit) = match reaper.spawn(&spec) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir(&cgroup.dir);
                return Err(io_err(format!("{what}: spawn"), e));
            }
        };
        tracing::info!(pid = spawned.pid, "pod pause process started");
        let mut watch = exit.clone();
        let pid = spawned.pid;
        tokio::spawn(async move {
            let e = wait_exit(&mut watch).await;
            tracing::info!(pid, status = e.status, "pod pause process exited");
        });
        Ok(Self {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            exit,
            cgroup,
        })
    }

    /// True until it exited.
    pub fn is_alive(&self) -> bool {
        self.exit.borrow().is_none()
    }

    /// Kills it (and so every process of the pod's pid namespace), waits
    /// for its exit and removes its cgroup.
    pub async fn stop(mut self) -> Result<()> {
        if self.is_alive() {
            match pidfd_signal(&self.pidfd, libc::SIGKILL) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => {
                    return Err(io_err(
                        format!("the pod's pause process (pid {}): SIGKILL", self.pid),
                        e,
                    ))
                }
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), wait_exit(&mut self.exit))
            .await
            .is_err()
        {
            return Err(AgentError::DeadlineExceeded(format!(
                "the pod's pause process (pid {}) did not exit within 10s of SIGKILL",
                self.pid
            )));
        }
        self.cgroup.remove(CGROUP_NAME).await
    }
}

/// `capsule-agent pod-pause`: PID 1 of the pod's pid namespace. Reaps what
/// is orphaned there; exits on SIGTERM or SIGINT (the agent uses SIGKILL).
/// The signals are blocked and taken with `sigwait`: a namespace's PID 1
/// never receives signals it has no handler for, but blocked signals are
/// queued.
pub fn pause_main() -> ! {
    // stdio is /dev/null: a failure shows as exit status 1, which the
    // agent logs.
    let code = match pause_loop() {
        Ok(never) => match never {},
        Err(_) => 1,
    };
    // SAFETY: _exit ends the process at once; nothing of ours needs flushing.
    unsafe { libc::_exit(code) }
}

fn pause_loop() -> nix::Result<Infallible> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        set.add(s);
    }
    set.thread_block()?;
    loop {
        match set.wait()? {
            Signal::SIGCHLD => reap_orphans(),
            // SAFETY: _exit ends the process at once.
            _ => unsafe { libc::_exit(0) },
        }
    }
}

fn reap_orphans() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
    }
}
