//! The QEMU process: spawn, the single reaper, exit observation, signals
//! through a pidfd (never to a recycled pid), start-time checks, stop.
//!
//! A spawned QEMU is a child of this process. Exactly one task owns the
//! `Child` and reaps it; everyone else observes the exit through a watch
//! channel. An adopted QEMU (another process started it) is watched through
//! its pidfd; whoever is its parent reaps it.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when it exited normally and we reaped it.
    pub code: Option<i32>,
    /// Terminating signal, when killed and we reaped it.
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "signal {s}"),
            (None, None) => f.write_str("exited (status unknown: not our child)"),
        }
    }
}

/// Reads field 22 (`starttime`, clock ticks since boot) of `/proc/<pid>/stat`.
pub fn proc_start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_start_time(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: cannot parse starttime"),
        )
    })
}

/// Field 22 of a `/proc/<pid>/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ")" come fields 3.. ; starttime is field 22 → index 19.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// A pidfd: signals go to exactly the process it was opened for.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    pub fn open(pid: u32) -> io::Result<Self> {
        let pid =
            libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: plain syscall with integer arguments.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel just returned this new descriptor; we own it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// `pidfd_send_signal`. `ESRCH` once the process has exited.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: plain syscall; a null siginfo is allowed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Options for [`VmProcess::spawn`].
#[derive(Debug, Default)]
pub struct SpawnOptions<'a> {
    /// File receiving QEMU's stdout and stderr.
    pub log: Option<&'a Path>,
    /// Descriptors QEMU must inherit (their numbers are on its command line).
    pub inherit_fds: Vec<RawFd>,
    /// PR_SET_PDEATHSIG(SIGKILL).
    pub die_with_parent: bool,
    /// Run it in this network namespace (an open nsfs descriptor), e.g. the
    /// pod's: QEMU itself needs no host network.
    pub netns: Option<RawFd>,
    /// Capabilities it keeps (bit numbers); every other one is dropped from
    /// its bounding, inheritable and ambient sets before exec, so a root
    /// process runs with these alone. `None`: left as they are.
    pub keep_capabilities: Option<&'a [u32]>,
}

/// What QEMU keeps of root's capabilities: CAP_IPC_LOCK, to pin guest
/// memory for VFIO's DMA mappings. Everything else it opens is root's own
/// (device nodes, the state directory, sockets), so file permissions
/// suffice; taps arrive as descriptors, and the netns is entered before
/// exec.
pub const QEMU_CAPABILITIES: &[u32] = &[CAP_IPC_LOCK];

/// linux/capability.h
const CAP_IPC_LOCK: u32 = 14;

/// The highest capability number this code knows (CAP_CHECKPOINT_RESTORE);
/// dropping stops at the first number the kernel rejects.
const CAP_LAST_KNOWN: u32 = 40;

/// Drops every capability not in `keep` from the bounding set, clears the
/// inheritable and ambient sets. Runs between fork and exec: only
/// async-signal-safe syscalls.
fn drop_capabilities(keep: &[u32]) -> io::Result<()> {
    for cap in 0..=CAP_LAST_KNOWN {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } < 0 {
            let e = io::Error::last_os_error();
            // EINVAL: a capability this kernel does not have.
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(e);
        }
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // The inheritable set: capget, clear, capset (v3: two 32-bit words).
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut hdr = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget writes two Data words for a v3 header; both outlive the call.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr as *mut Header, data.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    for d in &mut data {
        d.inheritable = 0;
    }
    // SAFETY: capset reads the header and two Data words, which outlive the call.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A running (or exited) QEMU process.
#[derive(Debug)]
pub struct VmProcess {
    pid: u32,
    start_time: u64,
    pidfd: Option<PidFd>,
    exit: watch::Receiver<Option<ExitInfo>>,
    child: bool,
}

/// Why an existing process cannot be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("process {pid} is gone")]
    Gone { pid: u32 },
    #[error("process {pid} started at tick {actual}, not {expected}: the pid was reused; not touching it")]
    Reused {
        pid: u32,
        expected: u64,
        actual: u64,
    },
    #[error("process {pid}: {source}")]
    Io {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

impl VmProcess {
    /// Spawns `program args`. The returned handle owns the only reaper.
    pub fn spawn(program: &Path, args: &[String], opts: SpawnOptions<'_>) -> io::Result<Self> {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).stdin(Stdio::null()).kill_on_drop(false);
        // Its own process group: a ^C or a group kill aimed at the runtime
        // does not take the VM down with it.
        cmd.process_group(0);
        match opts.log {
            Some(log) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let fds = opts.inherit_fds.clone();
        let die = opts.die_with_parent;
        let netns = opts.netns;
        let keep: Option<Vec<u32>> = opts.keep_capabilities.map(<[u32]>::to_vec);
        // SAFETY: the closure only makes async-signal-safe syscalls (setns, fcntl, prctl, capget/capset) on descriptors the caller keeps open until spawn returns; `keep` was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(ns) = netns {
                    if libc::setns(ns, libc::CLONE_NEWNET) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if die && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Last: setns needs CAP_SYS_ADMIN.
                if let Some(keep) = &keep {
                    drop_capabilities(keep)?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("spawned QEMU has no pid"))?;
        // Unreaped, the pid cannot be reused yet: the pidfd and start time
        // are certainly this child's.
        let pidfd = PidFd::open(pid)
            .map_err(|e| tracing::warn!(pid, error = %e, "pidfd_open failed; signals go by pid"))
            .ok();
        let start_time = proc_start_time(pid).unwrap_or(0);
        let (tx, rx) = watch::channel(None);
        let program = program.display().to_string();
        // The one and only reaper.
        tokio::spawn(async move {
            let info = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    ExitInfo {
                        code: status.code(),
                        signal: status.signal(),
                    }
                }
                Err(e) => {
                    tracing::error!(pid, %program, error = %e, "waiting for the process failed");
                    ExitInfo {
                        code: None,
                        signal: None,
                    }
                }
            };
            tracing::info!(pid, %program, %info, "process exited");
            tx.send_replace(Some(info));
        });
        Ok(Self {
            pid,
            start_time,
            pidfd,
            exit: rx,
            child: true,
        })
    }

    /// Adopts a running process that another process started, after checking
    /// it is the same process (pid + start time).
    pub fn adopt(pid: u32, expected_start_time: u64) -> Result<Self, AdoptError> {
        let gone = |e: io::Error| {
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
                AdoptError::Gone { pid }
            } else {
                AdoptError::Io { pid, source: e }
            }
        };
        // Open the pidfd first, then check the start time: if it matches now,
        // the pidfd is pinned to that very process.
        let pidfd = PidFd::open(pid).map_err(gone)?;
        let actual = proc_start_time(pid).map_err(gone)?;
        if actual != expected_start_time {
            return Err(AdoptError::Reused {
                pid,
                expected: expected_start_time,
                actual,
            });
        }
        let (tx, rx) = watch::channel(None);
        let fd = pidfd
            .0
            .try_clone()
            .map_err(|e| AdoptError::Io { pid, source: e })?;
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and refers to the same pidfd for the AsyncFd's whole life.
        match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
        {
            Ok(afd) => {
                tokio::spawn(async move {
                    // A pidfd turns readable when the process exits.
                    let _ = afd.readable().await;
                    tracing::info!(pid, "adopted QEMU exited");
                    tx.send_replace(Some(ExitInfo {
                        code: None,
                        signal: None,
                    }));
                });
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "cannot poll the pidfd; watching /proc instead");
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if proc_start_time(pid).ok() != Some(expected_start_time) {
                            tx.send_replace(Some(ExitInfo {
                                code: None,
                                signal: None,
                            }));
                            return;
                        }
                    }
                });
            }
        }
        Ok(Self {
            pid,
            start_time: actual,
            pidfd: Some(pidfd),
            exit: rx,
            child: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Clock ticks since boot at which the process started (0 if unknown).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Whether this process spawned it (and reaps it).
    pub fn is_child(&self) -> bool {
        self.child
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// A receiver that turns `Some` when the process is gone.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit.clone()
    }

    /// Waits for the exit, at most `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitInfo> {
        let mut rx = self.exit.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some())).await;
        match r {
            Ok(Ok(v)) => *v,
            // The reaper is gone without a verdict: only at runtime shutdown.
            Ok(Err(_)) => None,
            Err(_) => None,
        }
    }

    /// Sends `sig` to the process, never to a recycled pid. A process that
    /// already exited is not an error.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        if self.has_exited() {
            return Ok(());
        }
        let res = match &self.pidfd {
            Some(fd) => fd.signal(sig),
            None => {
                // No pidfd: re-check the start time right before kill(2).
                if proc_start_time(self.pid).ok() != Some(self.start_time) {
                    return Ok(());
                }
                let pid = libc::pid_t::try_from(self.pid)
                    .map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
                // SAFETY: plain syscall.
                if unsafe { libc::kill(pid, sig) } < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
        };
        match res {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// SIGTERM, wait; SIGKILL, wait. Returns whether it is gone.
    pub async fn terminate(&self, term_timeout: Duration, kill_timeout: Duration) -> bool {
        if self.has_exited() {
            return true;
        }
        if let Err(e) = self.signal(libc::SIGTERM) {
            tracing::warn!(pid = self.pid, error = %e, "SIGTERM failed");
        }
        if self.wait_exit(term_timeout).await.is_some() {
            return true;
        }
        tracing::warn!(pid = self.pid, "QEMU ignored SIGTERM; sending SIGKILL");
        self.kill(kill_timeout).await
    }

    /// SIGKILL and wait.
    pub async fn kill(&self, timeout: Duration) -> bool {
        if let Err(e) = self.signal(libc::SIGKILL) {
            tracing::error!(pid = self.pid, error = %e, "SIGKILL failed");
        }
        self.wait_exit(timeout).await.is_some()
    }

    /// Number of open descriptors of the process (for leak checks).
    pub fn fd_count(&self) -> io::Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid))?.count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_start_time_survives_odd_command_names() {
        let stat = "1234 (qemu) (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 1000 100";
        assert_eq!(parse_stat_start_time(stat), Some(987654));
        assert_eq!(parse_stat_start_time("garbage"), None);
        assert_eq!(parse_stat_start_time("1 (x) S 1 2"), None);
        let me = proc_start_time(std::process::id()).unwrap();
        assert!(me > 0);
    }

    #[tokio::test]
    async fn spawned_child_is_reaped_once_and_observed() {
        let p =
            VmProcess::spawn(Path::new("sleep"), &["30".into()], SpawnOptions::default()).unwrap();
        assert!(p.is_child());
        assert!(!p.has_exited());
        assert_eq!(p.start_time(), proc_start_time(p.pid()).unwrap());
        // Adopting it (as a restarted runtime would) checks the start time.
        let adopted = VmProcess::adopt(p.pid(), p.start_time()).unwrap();
        assert!(matches!(
            VmProcess::adopt(p.pid(), p.start_time() + 1),
            Err(AdoptError::Reused { .. })
        ));
        assert!(
            p.terminate(Duration::from_secs(2), Duration::from_secs(2))
                .await
        );
        assert_eq!(p.exit_info().unwrap().signal, Some(libc::SIGTERM));
        assert!(adopted.wait_exit(Duration::from_secs(2)).await.is_some());
        // Reaped: no zombie left.
        assert!(std::fs::metadata(format!("/proc/{}", p.pid())).is_err());
        // Signalling an exited process is a no-op.
        p.signal(libc::SIGKILL).unwrap();
    }

    #[tokio::test]
    async fn adopting_a_gone_pid_fails() {
        let p = VmProcess::spawn(Path::new("true"), &[], SpawnOptions::default()).unwrap();
        let pid = p.pid();
        p.wait_exit(Duration::from_secs(5)).await.unwrap();
        assert!(matches!(
            VmProcess::adopt(pid, 1),
            Err(AdoptError::Gone { .. })
        ));
    }
}
