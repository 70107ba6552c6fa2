//! A process the agent started: pid, pidfd, exit and stdio.
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::reaper::{wait_exit, Exit, ExitRx};
use crate::spawn::pidfd_signal;
use crate::stdio::Stdio;

pub struct ProcessEntry {
    /// Empty for the container init.
    pub exec_id: String,
    pub pid: i32,
    pidfd: OwnedFd,
    exit: ExitRx,
    pub stdio: Stdio,
    /// A WaitProcess returned the exit status.
    exit_reported: AtomicBool,
}

impl ProcessEntry {
    pub fn new(exec_id: String, pid: i32, pidfd: OwnedFd, exit: ExitRx, stdio: Stdio) -> Self {
        Self {
            exec_id,
            pid,
            pidfd,
            exit,
            stdio,
            exit_reported: AtomicBool::new(false),
        }
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the exit (returns at once after it). Cancel-safe.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        wait_exit(&mut rx).await
    }

    /// Records that a WaitProcess returned the exit status to the host.
    pub fn mark_exit_reported(&self) {
        self.exit_reported.store(true, Ordering::SeqCst);
    }

    /// True once a WaitProcess returned the exit status (not merely once the
    /// process exited: a host that drains the output first and then waits
    /// must still find the exec).
    pub fn exit_reported(&self) -> bool {
        self.exit_reported.load(Ordering::SeqCst)
    }

    /// Sends `sig` through the pidfd: never reaches a recycled pid. ESRCH
    /// once the process is gone.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        if self.exited().is_some() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        pidfd_signal(&self.pidfd, sig)
    }

    pub fn name(&self, cid: &str) -> String {
        if self.exec_id.is_empty() {
            format!("container {cid:?} init process")
        } else {
            format!("container {cid:?} exec {:?}", self.exec_id)
        }
    }
}
