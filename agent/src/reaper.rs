//! The agent's only `waitpid(-1)` caller.
//!
//! As PID 1 the agent inherits every orphan of the guest. A SIGCHLD-driven
//! task reaps all exited children and hands the status of the agent's own
//! children (container inits, exec'd processes, helper commands) to their
//! waiters through a pid -> sender map. [`Reaper::spawn`] holds the map lock
//! across the clone and the insert, and the reaper takes the same lock before
//! it looks a pid up, so a child that exits at once is still routed.
//!
//! Nothing else in the agent may wait for children: no `std::process::Child::
//! wait`, no `tokio::process` (both would race with this reaper). Helpers that
//! need a command's output use [`Reaper::run_command`].
use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::container::spec::exit_status;
use crate::spawn::{clone_exec, SpawnSpec, Spawned};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: i32,
    pub at: SystemTime,
}

pub type ExitRx = watch::Receiver<Option<Exit>>;

#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, watch::Sender<Option<Exit>>>>,
}

impl Reaper {
    /// Registers for SIGCHLD and starts reaping. Must run inside the tokio
    /// runtime and before the first spawn.
    pub fn start() -> io::Result<Arc<Self>> {
        let reaper = Arc::new(Self::default());
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sig.recv().await.is_none() {
                    tracing::error!("SIGCHLD stream ended; zombies will pile up");
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns and registers the child; the receiver yields its exit.
    pub fn spawn(&self, spec: &SpawnSpec<'_>) -> io::Result<(Spawned, ExitRx)> {
        let mut map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let child = clone_exec(spec)?;
        let (tx, rx) = watch::channel(None);
        map.insert(child.pid, tx);
        Ok((child, rx))
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return,
                Ok(st) => {
                    let Some(pid) = st.pid() else { continue };
                    let Some(status) = exit_status(st) else {
                        continue;
                    };
                    self.deliver(pid.as_raw(), status);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => return,
                Err(e) => {
                    tracing::error!(error = %e, "waitpid(-1) failed");
                    return;
                }
            }
        }
    }

    fn deliver(&self, pid: i32, status: i32) {
        let tx = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
        match tx {
            Some(tx) => {
                tracing::debug!(pid, status, "child exited");
                let _ = tx.send(Some(Exit {
                    status,
                    at: SystemTime::now(),
                }));
            }
            None => tracing::debug!(pid, status, "reaped orphan"),
        }
    }

    /// Runs `program args...` (no namespaces), capturing stdout and stderr,
    /// killing it after `timeout`. For helpers (modprobe, mkfs, ...).
    pub async fn run_command(
        &self,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> io::Result<CommandOutput> {
        let mut argv = vec![program];
        argv.extend_from_slice(args);
        let argv = crate::spawn::cstrings("command", &argv).map_err(io::Error::other)?;
        let program_c = CString::new(program).map_err(io::Error::other)?;
        let envp = crate::spawn::cstrings("env", &["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
            .map_err(io::Error::other)?;
        let null: OwnedFd = std::fs::File::open("/dev/null")?.into();
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let spec = SpawnSpec {
            program: program_c,
            argv,
            envp,
            fds: vec![(null.as_fd(), 0), (out_w.as_fd(), 1), (err_w.as_fd(), 2)],
            namespaces: 0,
            cgroup: None,
        };
        let (child, mut exit) = self.spawn(&spec)?;
        drop((out_w, err_w, null));
        let mut out_r = tokio::net::unix::pipe::Receiver::from_owned_fd(out_r)?;
        let mut err_r = tokio::net::unix::pipe::Receiver::from_owned_fd(err_r)?;
        let run = async {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let (a, b) = tokio::join!(out_r.read_to_end(&mut out), err_r.read_to_end(&mut err));
            a?;
            b?;
            let st = wait_exit(&mut exit).await;
            Ok::<_, io::Error>(CommandOutput {
                status: st.status,
                stdout: out,
                stderr: err,
            })
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => {
                let _ = crate::spawn::pidfd_signal(&child.pidfd, libc::SIGKILL);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{program} did not finish within {timeout:?}"),
                ))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Waits for the exit in `rx` (returns at once if it already happened).
pub async fn wait_exit(rx: &mut ExitRx) -> Exit {
    loop {
        if let Some(e) = *rx.borrow_and_update() {
            return e;
        }
        if rx.changed().await.is_err() {
            // The sender is only dropped after sending.
            if let Some(e) = *rx.borrow() {
                return e;
            }
            return Exit {
                status: 255,
                at: SystemTime::now(),
            };
        }
    }
}
