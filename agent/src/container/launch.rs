//! Plumbing of starting a container process from the agent: the config
//! memfd, the status pipe, the console socket of terminal processes.
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::memfd::{memfd_create, MFdFlags};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;

use super::cgroup::Cgroup;
use super::child::{self, Status};
use super::namespaces::OpenedNs;
use super::SETUP_TIMEOUT;
use crate::error::{io_err, AgentError, Result};
use crate::reaper::{ExitRx, Reaper};
use crate::spawn::Spawned;
use crate::stdio::{ChildStdio, Stdio};

/// Runs `spawn` on a thread of its own with the namespaces to join:
/// `setns` changes the calling thread (for pid: the namespace of its future
/// children), so it must never run on a runtime thread. The thread ends
/// with the spawn, taking the joined namespaces with it.
pub(super) async fn spawn_on_thread<F>(
    reaper: &Arc<Reaper>,
    what: &str,
    joins: Vec<OpenedNs>,
    spawn: F,
) -> Result<(Spawned, ExitRx)>
where
    F: FnOnce(&Reaper, Vec<OpenedNs>) -> Result<(Spawned, ExitRx)> + Send + 'static,
{
    let reaper = reaper.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ns-spawn".into())
        .spawn(move || {
            // The receiver only goes away when the request was dropped; the
            // child (if any) is then still reaped by the reaper.
            let _ = tx.send(spawn(&reaper, joins));
        })
        .map_err(|e| io_err(format!("{what}: spawn thread"), e))?;
    rx.await
        .map_err(|_| AgentError::Internal(format!("{what}: spawn thread died")))?
}

/// A sealed-enough memfd holding `data`, read by the child as fd 3.
pub(super) fn config_fd(what: &str, data: &[u8]) -> Result<OwnedFd> {
    let fd = memfd_create(c"capsule-config", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| crate::error::sys_err(format!("{what}: memfd"), e))?;
    let mut f = File::from(fd);
    f.write_all(data)
        .map_err(|e| io_err(format!("{what}: write config"), e))?;
    nix::unistd::lseek(&f, 0, nix::unistd::Whence::SeekSet)
        .map_err(|e| crate::error::sys_err(format!("{what}: seek config"), e))?;
    Ok(f.into())
}

pub(super) fn pipe_pair(what: &str) -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| crate::error::sys_err(format!("{what}: pipe"), e))
}

pub(super) fn cgroup_fd(what: &str, cg: &Cgroup) -> Result<OwnedFd> {
    let f = File::open(&cg.dir)
        .map_err(|e| io_err(format!("{what}: open cgroup {}", cg.dir.display()), e))?;
    Ok(f.into())
}

/// Reads the next status line: Ok(Some(Ready)), Err(child's error), or
/// Ok(None) at EOF.
pub(super) async fn next_status(
    what: &str,
    r: &mut BufReader<pipe::Receiver>,
    timeout: Duration,
) -> Result<Option<Status>> {
    let mut line = String::new();
    let n = tokio::time::timeout(timeout, r.read_line(&mut line))
        .await
        .map_err(|_| {
            AgentError::DeadlineExceeded(format!(
                "{what}: no answer from the process within {timeout:?}"
            ))
        })?
        .map_err(|e| io_err(format!("{what}: reading status"), e))?;
    if n == 0 {
        return Ok(None);
    }
    match child::parse_status_line(line.trim_end().as_bytes()) {
        Some(Status::Error(e)) => Err(AgentError::Internal(e)),
        Some(Status::BadProcess(e)) => Err(AgentError::InvalidArgument(e)),
        Some(s) => Ok(Some(s)),
        None => Err(AgentError::Internal(format!(
            "{what}: unreadable status {line:?}"
        ))),
    }
}

pub(super) fn child_fds<'a>(
    io: &'a ChildIo,
    config: &'a OwnedFd,
    start: Option<&'a OwnedFd>,
    status: &'a OwnedFd,
) -> Vec<(std::os::fd::BorrowedFd<'a>, i32)> {
    let [a, b, c] = io.stdio.borrowed();
    let mut v = vec![
        (a, 0),
        (b, 1),
        (c, 2),
        (config.as_fd(), child::FD_CONFIG),
        (status.as_fd(), child::FD_STATUS),
    ];
    if let Some(s) = start {
        v.push((s.as_fd(), child::FD_START));
    }
    if let Some(c) = &io.console {
        v.push((c.as_fd(), child::FD_CONSOLE));
    }
    v
}

/// What a starting process gets: stdio fds (pipes, or /dev/null placeholders
/// for a terminal) and, for a terminal, its end of the console socket.
pub(super) struct ChildIo {
    stdio: ChildStdio,
    console: Option<OwnedFd>,
}

/// The agent's side: the pipes, or the console socket the process sends
/// its pty master back on.
pub(super) struct AgentIo {
    pipes: Option<Stdio>,
    console: Option<OwnedFd>,
}

pub(super) fn stdio_for(what: &str, terminal: bool, stdin: bool) -> Result<(ChildIo, AgentIo)> {
    let io_e = |e| io_err(format!("{what}: stdio"), e);
    if terminal {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (agent, child) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| crate::error::sys_err(format!("{what}: console socket"), e))?;
        let placeholder = Stdio::terminal_placeholder().map_err(io_e)?;
        return Ok((
            ChildIo {
                stdio: placeholder,
                console: Some(child),
            },
            AgentIo {
                pipes: None,
                console: Some(agent),
            },
        ));
    }
    let (pipes, child) = Stdio::pipes(stdin).map_err(io_e)?;
    Ok((
        ChildIo {
            stdio: child,
            console: None,
        },
        AgentIo {
            pipes: Some(pipes),
            console: None,
        },
    ))
}

impl AgentIo {
    /// The process's stdio once it is set up: the pipes, or a terminal from
    /// the master it sent. When it fails before sending one, its status
    /// line says why.
    pub(super) async fn finish(
        self,
        what: &str,
        stdin: bool,
        size: Option<(u16, u16)>,
        status: &mut BufReader<pipe::Receiver>,
    ) -> Result<Stdio> {
        if let Some(p) = self.pipes {
            return Ok(p);
        }
        let Some(sock) = self.console else {
            return Err(AgentError::Internal(format!("{what}: no stdio")));
        };
        match recv_master(what, sock).await? {
            Some(master) => Stdio::from_master(master, stdin, size)
                .map_err(|e| io_err(format!("{what}: terminal"), e)),
            None => Err(match next_status(what, status, SETUP_TIMEOUT).await {
                Err(e) => e,
                Ok(_) => AgentError::Internal(format!("{what}: the process sent no terminal")),
            }),
        }
    }
}

/// Receives the pty master (SCM_RIGHTS); `None` when the process closed the
/// socket without sending one.
pub(super) async fn recv_master(what: &str, sock: OwnedFd) -> Result<Option<OwnedFd>> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let std_sock = std::os::unix::net::UnixStream::from(sock);
    std_sock
        .set_nonblocking(true)
        .map_err(|e| io_err(format!("{what}: console socket"), e))?;
    let sock = tokio::net::UnixStream::from_std(std_sock)
        .map_err(|e| io_err(format!("{what}: console socket"), e))?;
    let recv = || -> std::io::Result<Option<OwnedFd>> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut buf = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                if let Some(&fd) = fds.first() {
                    // SAFETY: the kernel just gave us this fd.
                    return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
        }
        if msg.bytes == 0 {
            return Ok(None);
        }
        Err(std::io::Error::other("message without a file descriptor"))
    };
    let fut = async {
        loop {
            sock.readable().await?;
            match sock.try_io(tokio::io::Interest::READABLE, recv) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    };
    tokio::time::timeout(SETUP_TIMEOUT, fut)
        .await
        .map_err(|_| {
            AgentError::DeadlineExceeded(format!(
                "{what}: no terminal from the process within {SETUP_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| io_err(format!("{what}: receive terminal"), e))
}
