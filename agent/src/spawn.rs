//! Starting child processes from the multithreaded agent: `clone3` + `execve`.
//!
//! The child of a fork in a multithreaded process may only run
//! async-signal-safe code until it execs, so everything (argv, envp, fd
//! moves) is prepared before the clone and the child does `dup2`, resets
//! signals and calls `execve`, nothing else. All real setup happens after the
//! exec, in the agent binary itself (`init-container` / `exec-enter`
//! subcommands), which is single-threaded there.
//!
//! `clone3` gives three things `fork` does not: a pidfd for the exact process
//! (signals never hit a recycled pid), the namespaces of a container init in
//! the same call (CLONE_NEWPID makes the child PID 1 of its namespace), and
//! CLONE_INTO_CGROUP (the child is born in the container's cgroup).
//!
//! Never call this directly: go through [`crate::reaper::Reaper::spawn`], which
//! registers the pid before the child can be reaped.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `CLONE_INTO_CGROUP` (libc's constant is an overflowing c_int).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Highest fd number a child may receive (targets are 0..=MAX_TARGET_FD).
pub const MAX_TARGET_FD: RawFd = 9;

pub struct SpawnSpec<'a> {
    /// Program to exec (absolute path).
    pub program: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// `(fd, target)`: `fd` becomes the child's `target` (0..=9).
    pub fds: Vec<(BorrowedFd<'a>, RawFd)>,
    /// Extra `CLONE_NEW*` flags.
    pub namespaces: u64,
    /// Directory fd of the cgroup the child is born in.
    pub cgroup: Option<BorrowedFd<'a>>,
}

pub struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
}

/// Clones and execs. Returns once the child exists (not once it exec'd).
pub fn clone_exec(spec: &SpawnSpec<'_>) -> io::Result<Spawned> {
    // Move every fd to >= 10 (close-on-exec) first so the dup2s in the child
    // cannot clobber each other.
    let mut moved: Vec<(OwnedFd, RawFd)> = Vec::with_capacity(spec.fds.len());
    for (fd, target) in &spec.fds {
        if !(0..=MAX_TARGET_FD).contains(target) {
            return Err(io::Error::other(format!("child fd {target} out of range")));
        }
        // SAFETY: F_DUPFD_CLOEXEC takes an int and duplicates an fd that is open for the duration of the call (borrowed).
        let d = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, MAX_TARGET_FD + 1) };
        if d < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `d` is the new fd fcntl just returned; nothing else owns it.
        moved.push((unsafe { OwnedFd::from_raw_fd(d) }, *target));
    }
    let pairs: Vec<(RawFd, RawFd)> = moved.iter().map(|(fd, t)| (fd.as_raw_fd(), *t)).collect();
    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = spec.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let empty_set = nix::sys::signal::SigSet::empty();

    let mut pidfd: libc::c_int = -1;
    let mut flags = libc::CLONE_PIDFD as u64 | spec.namespaces;
    // SAFETY: clone_args is a struct of integers, for which all zeroes is a valid value (and what clone3 expects for unused fields).
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    if let Some(cg) = &spec.cgroup {
        flags |= CLONE_INTO_CGROUP;
        args.cgroup = cg.as_raw_fd() as u64;
    }
    args.flags = flags;
    args.pidfd = &mut pidfd as *mut libc::c_int as u64;
    args.exit_signal = libc::SIGCHLD as u64;

    // SAFETY: clone3 reads `args` (valid for the call, its size passed) and writes the pidfd into `pidfd`, which outlives the call. Without CLONE_VM the child gets a copy of the address space, and runs only the async-signal-safe code below before execve or _exit.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if ret == 0 {
        // Child: async-signal-safe calls only, no allocation, no panics.
        // Each failure exits with its own status (the parent sees it as the
        // process's exit): 126 dup2, 125 signal setup, 127 execve.
        // SAFETY: dup2, signal, sigprocmask, execve and _exit are async-signal-safe; every pointer (the set, argv, envp and their strings, the program path) was built before the clone and is alive in this copy of the address space.
        unsafe {
            for &(fd, target) in &pairs {
                if libc::dup2(fd, target) < 0 {
                    libc::_exit(126);
                }
            }
            if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR
                || libc::sigprocmask(libc::SIG_SETMASK, empty_set.as_ref(), std::ptr::null_mut())
                    < 0
            {
                libc::_exit(125);
            }
            libc::execve(spec.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(moved);
    Ok(Spawned {
        pid: ret as i32,
        // SAFETY: clone3 succeeded with CLONE_PIDFD, so `pidfd` is a new fd that nothing else owns.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
    })
}

/// `pidfd_send_signal(2)`. ESRCH once the process has been reaped.
pub fn pidfd_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes an fd open for the call (borrowed), a signal number, a null siginfo (the kernel fills it in) and flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The agent binary, for re-exec with a hidden subcommand.
pub fn self_exe() -> CString {
    CString::from(c"/proc/self/exe")
}

/// `CString`s of a string list, rejecting NUL bytes with the item named.
pub fn cstrings<S: AsRef<str>>(what: &str, items: &[S]) -> Result<Vec<CString>, String> {
    items
        .iter()
        .map(|s| {
            CString::new(s.as_ref())
                .map_err(|_| format!("{what}: {:?} contains a NUL byte", s.as_ref()))
        })
        .collect()
}
