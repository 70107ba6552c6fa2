//! The agent binary re-executed as a container process (hidden subcommands).
//!
//! `/proc/self/exe init-container`: PID 1 of a new container, already in its
//! namespaces and cgroup (clone3 did that). It builds the rootfs, reports
//! "ready", waits for StartContainer, then becomes the container process.
//!
//! `/proc/self/exe exec-enter`: an extra process, already in the container's
//! pid namespace and cgroup. It joins the other namespaces of the container
//! init and its root, then becomes the process.
//!
//! Both run single-threaded and talk to the agent through fixed fds:
//! 0-2 stdio, 3 config JSON (memfd), 4 start pipe (init only: one byte =
//! start, EOF = abort), 5 status pipe (JSON lines; closed by the final exec,
//! so EOF after "ready" means the process runs), 6 console socket (terminal
//! processes only).
//!
//! Terminals are allocated *inside* the container, from its own devpts
//! (`/dev/ptmx` after the switch), like runc's console socket: the process
//! sees a /dev/pts/N that exists in its /dev (ttyname, `tty`, `stty` work),
//! and the master goes back to the agent over fd 6 with SCM_RIGHTS.
use std::convert::Infallible;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use nix::sched::{setns, CloneFlags};
use oci_spec::runtime::{LinuxSeccomp, Process, Spec};
use serde::{Deserialize, Serialize};

use super::spec::{cap_sets, exec_candidates, rlimits, CapSets};

pub const FD_CONFIG: i32 = 3;
pub const FD_START: i32 = 4;
pub const FD_STATUS: i32 = 5;
/// Terminal processes: a unix socket to send the pty master back on.
pub const FD_CONSOLE: i32 = 6;

/// A device the device module prepared, as sent to the init process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceWire {
    /// The protobuf `Device`, encoded.
    pub device: Vec<u8>,
    pub guest_major: u32,
    pub guest_minor: u32,
    pub guest_node: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    pub cid: String,
    pub spec: Spec,
    pub rootfs: PathBuf,
    pub devices: Vec<DeviceWire>,
    pub terminal: bool,
    /// The container has a UTS namespace, its own or the pod's (so the
    /// hostname is set, like runc does).
    pub set_hostname: bool,
    /// Privileged: the container's /dev gets every device node of the
    /// guest (see [`super::privileged`]).
    pub guest_devices: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecConfig {
    pub cid: String,
    pub exec_id: String,
    /// The container init, as the agent sees it.
    pub init_pid: i32,
    pub process: Process,
    pub terminal: bool,
    /// The container's `linux.seccomp`: execs get the container's filter,
    /// as with runc.
    pub seccomp: Option<LinuxSeccomp>,
}

impl From<String> for Status {
    fn from(e: String) -> Self {
        Status::Error(e)
    }
}

/// One line on the status pipe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ready,
    Error(String),
    /// The process itself cannot run (no such executable, bad cwd): the
    /// request was wrong rather than the agent.
    BadProcess(String),
}

pub fn init_container_main() -> ! {
    run_main(init_container)
}

pub fn exec_enter_main() -> ! {
    run_main(exec_enter)
}

fn run_main(f: fn() -> Result<Infallible, Status>) -> ! {
    let err = match f() {
        Ok(never) => match never {},
        Err(e) => e,
    };
    report(&err);
    exit_now(1)
}

/// `_exit`: no atexit handlers or stdio flushing in the container child.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process at once; it touches no memory of ours.
    unsafe { libc::_exit(code) }
}

pub fn report(s: &Status) {
    // SAFETY: fd 5 is the status pipe the agent gave this process; it stays open until execve closes it (CLOEXEC), and ManuallyDrop keeps this temporary File from closing it.
    let mut f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(FD_STATUS) });
    if let Ok(mut line) = serde_json::to_vec(s) {
        line.push(b'\n');
        // A write failure has nowhere to go: the agent then sees EOF
        // without a status and reports the exit.
        let _ = f.write_all(&line);
    }
}

/// Marks the agent's fds close-on-exec and closes everything above them.
/// The start pipe (init only) and the console socket (terminal processes
/// only) may be absent.
fn setup_fds() -> Result<(), String> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    for fd in [FD_CONFIG, FD_START, FD_STATUS, FD_CONSOLE] {
        // SAFETY: only used for this fcntl call, while fd `fd` is open (or the call fails with EBADF).
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        match fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EBADF) if fd == FD_START || fd == FD_CONSOLE => {}
            Err(e) => return Err(format!("mark fd {fd} close-on-exec: {}", e.desc())),
        }
    }
    // Nothing else of the agent may leak into the container.
    // SAFETY: close_range takes two fd numbers and flags, no pointers; no fd above FD_CONSOLE is owned by anything in this fresh process.
    let r = unsafe { libc::syscall(libc::SYS_close_range, FD_CONSOLE as u32 + 1, u32::MAX, 0) };
    if r < 0 {
        return Err(format!(
            "close the agent's other fds: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn read_config<T: for<'de> Deserialize<'de>>() -> Result<T, String> {
    // SAFETY: fd 3 is the config memfd the agent gave this process, taken over exactly once, here.
    let mut f = unsafe { File::from_raw_fd(FD_CONFIG) };
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .map_err(|e| format!("reading the config from the agent: {e}"))?;
    serde_json::from_slice(&buf).map_err(|e| format!("config from the agent is not valid: {e}"))
}

fn init_container() -> Result<Infallible, Status> {
    setup_fds()?;
    let cfg: InitConfig = read_config()?;
    let what = format!("container {:?}", cfg.cid);
    super::rootfs::prepare(&cfg).map_err(|e| format!("{what}: {e}"))?;
    if cfg.terminal {
        let slave = open_terminal(&what)?;
        super::rootfs::bind_console(&slave).map_err(|e| format!("{what}: {e}"))?;
    }
    report(&Status::Ready);
    // SAFETY: fd 4 is the start pipe the agent gave the init, taken over exactly once, here.
    let mut start = unsafe { File::from_raw_fd(FD_START) };
    let mut b = [0u8; 1];
    match start.read(&mut b) {
        Ok(1) => {}
        // The agent dropped the start pipe: creation was aborted.
        _ => exit_now(0),
    }
    drop(start);
    let process = cfg
        .spec
        .process()
        .clone()
        .ok_or_else(|| format!("{what}: spec has no process"))?;
    let seccomp = cfg.spec.linux().as_ref().and_then(|l| l.seccomp().clone());
    become_process(&what, &process, cfg.terminal, seccomp.as_ref())
}

fn exec_enter() -> Result<Infallible, Status> {
    setup_fds()?;
    let cfg: ExecConfig = read_config()?;
    let what = format!("container {:?} exec {:?}", cfg.cid, cfg.exec_id);
    let proc_dir = PathBuf::from(format!("/proc/{}", cfg.init_pid));
    // Open everything first: after joining the mount namespace, /proc/<pid>
    // is the container's procfs, where the init has another pid.
    let open =
        |p: PathBuf| File::open(&p).map_err(|e| format!("{what}: open {}: {e}", p.display()));
    let root = open(proc_dir.join("root"))?;
    let mut joins = Vec::new();
    for (ns, flag) in [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        joins.push((ns, flag, open(proc_dir.join("ns").join(ns))?));
    }
    for (ns, flag, f) in &joins {
        setns(f, *flag).map_err(|e| format!("{what}: join {ns} namespace: {}", e.desc()))?;
    }
    nix::unistd::fchdir(&root)
        .map_err(|e| format!("{what}: enter container root: {}", e.desc()))?;
    nix::unistd::chroot(".")
        .map_err(|e| format!("{what}: chroot into container root: {}", e.desc()))?;
    drop(joins);
    drop(root);
    if cfg.terminal {
        open_terminal(&what)?;
    }
    become_process(&what, &cfg.process, cfg.terminal, cfg.seccomp.as_ref())
}

/// Allocates a pty from the container's devpts, makes the slave our stdio,
/// and sends the master to the agent on [`FD_CONSOLE`]. Returns the slave path.
fn open_terminal(what: &str) -> Result<PathBuf, String> {
    use nix::fcntl::OFlag;
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| {
            format!(
                "{what}: terminal: open /dev/ptmx in the container: {}",
                e.desc()
            )
        })?;
    nix::pty::grantpt(&master).map_err(|e| format!("{what}: terminal: grantpt: {}", e.desc()))?;
    nix::pty::unlockpt(&master).map_err(|e| format!("{what}: terminal: unlockpt: {}", e.desc()))?;
    let name = nix::pty::ptsname_r(&master)
        .map_err(|e| format!("{what}: terminal: ptsname: {}", e.desc()))?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)
        .map_err(|e| format!("{what}: terminal: open {name}: {e}"))?;
    let fds = [master.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(b"m")];
    sendmsg::<()>(FD_CONSOLE, &iov, &cmsg, MsgFlags::empty(), None).map_err(|e| {
        format!(
            "{what}: terminal: send the master to the agent: {}",
            e.desc()
        )
    })?;
    for fd in 0..3 {
        // SAFETY: dup2 onto 0-2, which this process owns as its stdio; the source fd is open (borrowed from `slave`).
        if unsafe { libc::dup2(slave.as_raw_fd(), fd) } < 0 {
            return Err(format!(
                "{what}: terminal: dup2: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: fd 6 is the console socket the agent gave this process, taken over exactly once, here, and closed by the drop.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(FD_CONSOLE) });
    Ok(PathBuf::from(name))
}

/// Applies the OCI process settings and execs it. Returns only on error.
/// The order follows runc: seccomp before the capabilities are dropped when
/// no_new_privs is off (loading a filter then needs CAP_SYS_ADMIN), else
/// after no_new_privs, right before execve, so the profile sees as few of
/// the runtime's own syscalls as possible.
pub fn become_process(
    what: &str,
    p: &Process,
    terminal: bool,
    seccomp: Option<&LinuxSeccomp>,
) -> Result<Infallible, Status> {
    crate::signals::reset_for_exec().map_err(|e| format!("{what}: {e}"))?;
    nix::unistd::setsid().map_err(|e| format!("{what}: setsid: {}", e.desc()))?;
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal) and no pointer; fd 0 is this process's terminal.
    if terminal && unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
        return Err(format!(
            "{what}: set controlling terminal: {}",
            std::io::Error::last_os_error()
        )
        .into());
    }
    for (res, soft, hard) in rlimits(what, p).map_err(|e| e.to_string())? {
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: `lim` is a valid rlimit that setrlimit only reads.
        if unsafe { libc::setrlimit(res as _, &lim) } < 0 {
            return Err(format!(
                "{what}: setrlimit {res}: {}",
                std::io::Error::last_os_error()
            )
            .into());
        }
    }
    if let Some(adj) = p.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| format!("{what}: oom_score_adj {adj}: {e}"))?;
    }
    let caps = cap_sets(what, p).map_err(|e| e.to_string())?;
    let filter = seccomp
        .map(super::seccomp::compile)
        .transpose()
        .map_err(|e| format!("{what}: {e}"))?;
    // Everything execve needs is allocated before the filter is loaded.
    let plan = ExecPlan::new(what, p).map_err(Status::BadProcess)?;
    let nnp = p.no_new_privileges().unwrap_or(false);
    let load = |f: &super::seccomp::Filter| f.load().map_err(|e| format!("{what}: {e}"));
    if let (Some(f), false) = (&filter, nnp) {
        load(f)?;
    }
    set_ids_and_caps(what, p, caps)?;
    if nnp {
        nix::sys::prctl::set_no_new_privs()
            .map_err(|e| format!("{what}: no_new_privs: {}", e.desc()))?;
    }
    let umask = p.user().umask().unwrap_or(0o022);
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask));
    std::env::set_current_dir(p.cwd())
        .map_err(|e| Status::BadProcess(format!("{what}: cwd {}: {e}", p.cwd().display())))?;
    if let (Some(f), true) = (&filter, nnp) {
        load(f)?;
    }
    plan.exec(what).map_err(Status::BadProcess)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `prctl(option, arg)` with the other arguments 0.
fn prctl(option: libc::c_int, arg: libc::c_ulong, arg2: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: the options used here (KEEPCAPS, CAPBSET_DROP, CAP_AMBIENT) take integers only, no pointers.
    let r = unsafe { libc::prctl(option, arg, arg2, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_ids_and_caps(what: &str, p: &Process, caps: Option<CapSets>) -> Result<(), String> {
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
    let u = p.user();
    let err = |call: &str, e: &dyn std::fmt::Display| format!("{what}: {call}: {e}");
    if let Some(c) = caps {
        prctl(libc::PR_SET_KEEPCAPS, 1, 0).map_err(|e| err("keep capabilities", &e))?;
        for cap in 0..64u64 {
            if c.bounding & (1 << cap) == 0 {
                match prctl(libc::PR_CAPBSET_DROP, cap, 0) {
                    Ok(()) => {}
                    // Beyond the kernel's last capability: nothing left.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                    Err(e) => {
                        return Err(err(
                            &format!("drop capability {cap} from the bounding set"),
                            &e,
                        ))
                    }
                }
            }
        }
    }
    let groups: Vec<Gid> = u
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    setgroups(&groups).map_err(|e| err("setgroups", &e.desc()))?;
    let (gid, uid) = (Gid::from_raw(u.gid()), Uid::from_raw(u.uid()));
    setresgid(gid, gid, gid).map_err(|e| err("setresgid", &e.desc()))?;
    setresuid(uid, uid, uid).map_err(|e| err("setresuid", &e.desc()))?;
    if let Some(c) = caps {
        let mut hdr = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let lo = |m: u64| m as u32;
        let hi = |m: u64| (m >> 32) as u32;
        let data = [
            CapData {
                effective: lo(c.effective),
                permitted: lo(c.permitted),
                inheritable: lo(c.inheritable),
            },
            CapData {
                effective: hi(c.effective),
                permitted: hi(c.permitted),
                inheritable: hi(c.inheritable),
            },
        ];
        let (hdr_ptr, data_ptr) = (&mut hdr as *mut CapHeader, data.as_ptr());
        // SAFETY: capset with _LINUX_CAPABILITY_VERSION_3 reads one header and two data structs, which `hdr` and `data` are, both alive for the call.
        let r = unsafe { libc::syscall(libc::SYS_capset, hdr_ptr, data_ptr) };
        if r < 0 {
            return Err(err("capset", &std::io::Error::last_os_error()));
        }
        for cap in 0..64u64 {
            if c.ambient & (1 << cap) != 0 {
                prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap,
                )
                .map_err(|e| err(&format!("raise ambient capability {cap}"), &e))?;
            }
        }
        prctl(libc::PR_SET_KEEPCAPS, 0, 0).map_err(|e| err("drop keep capabilities", &e))?;
    }
    Ok(())
}

/// argv, envp and the candidate paths of the process (the PATH lookup), as
/// C strings: after the seccomp filter is loaded only execve runs.
struct ExecPlan {
    arg0: String,
    argv: Vec<CString>,
    envp: Vec<CString>,
    candidates: Vec<(PathBuf, CString)>,
}

impl ExecPlan {
    fn new(what: &str, p: &Process) -> Result<Self, String> {
        let args = p.args().clone().unwrap_or_default();
        let env = p.env().clone().unwrap_or_default();
        let argv = crate::spawn::cstrings(what, &args)?;
        let envp = crate::spawn::cstrings(what, &env)?;
        let arg0 = args
            .first()
            .ok_or_else(|| format!("{what}: process.args is empty"))?
            .clone();
        let candidates = exec_candidates(&arg0, &env)
            .into_iter()
            .filter_map(|c| {
                let cs = CString::new(c.as_os_str().as_encoded_bytes()).ok()?;
                Some((c, cs))
            })
            .collect();
        Ok(Self {
            arg0,
            argv,
            envp,
            candidates,
        })
    }

    fn exec(&self, what: &str) -> Result<Infallible, String> {
        let mut last = None;
        for (cand, path) in &self.candidates {
            match nix::unistd::execve(path, &self.argv, &self.envp) {
                Ok(never) => match never {},
                Err(e) => {
                    // Keep looking in PATH after "not there"; anything else is final.
                    let keep_looking =
                        matches!(e, nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR);
                    last = Some((cand, e));
                    if !keep_looking {
                        break;
                    }
                }
            }
        }
        let arg0 = &self.arg0;
        Err(match last {
            Some((path, nix::errno::Errno::ENOENT)) if !arg0.contains('/') => {
                format!(
                    "{what}: exec {arg0:?}: executable file not found in $PATH (last tried {})",
                    path.display()
                )
            }
            Some((path, e)) => format!("{what}: exec {}: {}", path.display(), e.desc()),
            None => format!("{what}: exec {arg0:?}: no candidate path"),
        })
    }
}

/// Used by the agent: reads status lines until "ready", an error or EOF.
pub fn parse_status_line(line: &[u8]) -> Option<Status> {
    serde_json::from_slice(line).ok()
}
