//! The namespaces of a container, the way runc treats `linux.namespaces`:
//! an entry without a path gets a new namespace, an entry with a path joins
//! that namespace, a type that is not listed is shared with the agent (the
//! VM, which is the pod). CRI uses paths to put the containers of a pod into
//! the pid, ipc and uts namespaces of its sandbox (pause) container:
//! `/proc/<guest pid of the sandbox init>/ns/<type>`.
//!
//! Paths are checked twice: their shape here ([`plan`], pure), and the
//! process they name when they are opened ([`open_joins`]): it must be a
//! live process of one of this sandbox's containers and the file must be a
//! namespace of the stated type. Anything else is refused; a namespace is
//! never silently created instead of joined.
//!
//! The network namespace is the VM's: a network path names a host
//! namespace, which means nothing in the guest, so it is ignored.
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::error::{AgentError, Result};

/// A namespace type the agent can create or join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NsKind {
    Mount,
    Pid,
    Ipc,
    Uts,
    Cgroup,
}

impl NsKind {
    /// The file name under `/proc/<pid>/ns/`.
    pub fn proc_name(self) -> &'static str {
        match self {
            Self::Mount => "mnt",
            Self::Pid => "pid",
            Self::Ipc => "ipc",
            Self::Uts => "uts",
            Self::Cgroup => "cgroup",
        }
    }

    /// The OCI name (`linux.namespaces[].type`).
    pub fn oci_name(self) -> &'static str {
        match self {
            Self::Mount => "mount",
            Self::Pid => "pid",
            Self::Ipc => "ipc",
            Self::Uts => "uts",
            Self::Cgroup => "cgroup",
        }
    }

    pub fn clone_flag(self) -> CloneFlags {
        match self {
            Self::Mount => CloneFlags::CLONE_NEWNS,
            Self::Pid => CloneFlags::CLONE_NEWPID,
            Self::Ipc => CloneFlags::CLONE_NEWIPC,
            Self::Uts => CloneFlags::CLONE_NEWUTS,
            Self::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        }
    }
}

/// A namespace to join: its type, the process that owns it, the path given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsJoin {
    pub kind: NsKind,
    pub pid: i32,
    pub path: PathBuf,
}

/// What the spec asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespacePlan {
    /// `CLONE_NEW*` flags of the namespaces to create (mount always).
    pub new: u64,
    /// Namespaces to join, in spec order.
    pub join: Vec<NsJoin>,
    /// Entries that were ignored, for the log.
    pub warnings: Vec<String>,
}

impl NamespacePlan {
    /// The container has this namespace of its own or its pod's (created
    /// or joined), rather than the VM's.
    pub fn has(&self, kind: NsKind) -> bool {
        self.new & kind.clone_flag().bits() as u64 != 0 || self.join.iter().any(|j| j.kind == kind)
    }
}

/// Reads `linux.namespaces` of container `cid`.
pub fn plan(cid: &str, spec: &Spec) -> Result<NamespacePlan> {
    let mut p = NamespacePlan {
        new: CloneFlags::CLONE_NEWNS.bits() as u64,
        ..Default::default()
    };
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    let mut seen = Vec::new();
    for ns in &namespaces {
        let typ = ns.typ();
        if seen.contains(&typ) {
            return Err(AgentError::invalid(format!(
                "container {cid:?}: namespace {typ} is listed twice"
            )));
        }
        seen.push(typ);
        let kind = match typ {
            LinuxNamespaceType::Mount => NsKind::Mount,
            LinuxNamespaceType::Pid => NsKind::Pid,
            LinuxNamespaceType::Ipc => NsKind::Ipc,
            LinuxNamespaceType::Uts => NsKind::Uts,
            LinuxNamespaceType::Cgroup => NsKind::Cgroup,
            // One sandbox = one VM = one network namespace, the pod's.
            LinuxNamespaceType::Network => {
                if let Some(path) = ns.path() {
                    p.warnings.push(format!(
                        "network namespace path {} ignored: the VM is the pod's network",
                        path.display()
                    ));
                }
                continue;
            }
            LinuxNamespaceType::Time => {
                p.warnings
                    .push("time namespace: not supported, sharing the VM's".to_string());
                continue;
            }
            LinuxNamespaceType::User => {
                return Err(AgentError::invalid(format!(
                    "container {cid:?}: user namespaces are not supported"
                )))
            }
        };
        let Some(path) = ns.path() else {
            p.new |= kind.clone_flag().bits() as u64;
            continue;
        };
        if kind == NsKind::Mount {
            // The init builds the container's root in its mount namespace
            // and pivots into it: in another container's namespace that
            // would move that container's root too.
            return Err(AgentError::invalid(format!(
                "container {cid:?}: mount namespace {}: joining another mount namespace is not supported (each container builds its own root)",
                path.display()
            )));
        }
        let pid = parse_ns_path(path, kind).map_err(|why| {
            AgentError::invalid(format!(
                "container {cid:?}: {} namespace path {}: {why}",
                kind.oci_name(),
                path.display()
            ))
        })?;
        p.new &= !(kind.clone_flag().bits() as u64);
        p.join.push(NsJoin {
            kind,
            pid,
            path: path.clone(),
        });
    }
    Ok(p)
}

/// The pid of `/proc/<pid>/ns/<name>`, when `name` is `kind`'s.
pub fn parse_ns_path(path: &Path, kind: NsKind) -> std::result::Result<i32, String> {
    let parts: Vec<&str> = path
        .components()
        .map(|c| match c {
            Component::RootDir => Some("/"),
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| "expected /proc/<pid>/ns/<type>".to_string())?;
    let ["/", "proc", pid, "ns", name] = parts.as_slice() else {
        return Err("expected /proc/<pid>/ns/<type>".into());
    };
    if path.as_os_str().len() != format!("/proc/{pid}/ns/{name}").len() {
        return Err("expected /proc/<pid>/ns/<type> (no extra slashes)".into());
    }
    let pid: i32 = match pid.parse() {
        Ok(n) if n > 0 && pid.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => return Err(format!("{pid:?} is not a process id")),
    };
    if *name != kind.proc_name() {
        return Err(format!(
            "names a {name:?} namespace, not {:?}",
            kind.proc_name()
        ));
    }
    Ok(pid)
}

/// A namespace opened for joining.
#[derive(Debug)]
pub struct OpenedNs {
    pub kind: NsKind,
    pub file: File,
}

/// Which container of the sandbox a guest pid belongs to, from its cgroup
/// (`/proc/<pid>/cgroup`, `0::/capsule/<cid>[/...]`).
pub fn container_of_cgroup(cgroup_file: &str) -> Option<&str> {
    let line = cgroup_file.lines().find_map(|l| l.strip_prefix("0::"))?;
    let rest = line
        .strip_prefix('/')?
        .strip_prefix(crate::paths::CGROUP_PARENT)?
        .strip_prefix('/')?;
    rest.split('/').next().filter(|c| !c.is_empty())
}

/// `ioctl(NS_GET_NSTYPE)`: the `CLONE_NEW*` type of a namespace file.
fn ns_type(f: &File) -> nix::Result<i32> {
    // _IO(0xb7, 0x3)
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd; the fd is open for the duration of the call (borrowed from `f`).
    let r = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    nix::errno::Errno::result(r)
}

/// Opens the namespaces to join, checking that each path names a live
/// process of this sandbox (in the cgroup of a container for which
/// `is_container` is true) and a namespace of the stated type. The pid is pinned with a
/// pidfd first and checked alive after the namespace is open, so a pid
/// reused in between is caught.
pub fn open_joins(
    cid: &str,
    joins: &[NsJoin],
    is_container: &dyn Fn(&str) -> bool,
) -> Result<Vec<OpenedNs>> {
    let mut out = Vec::with_capacity(joins.len());
    for j in joins {
        let what = format!(
            "container {cid:?}: {} namespace {}",
            j.kind.oci_name(),
            j.path.display()
        );
        let pidfd = pidfd_open(j.pid).map_err(|e| {
            AgentError::invalid(format!(
                "{what}: process {} is not running in the guest ({})",
                j.pid,
                e.desc()
            ))
        })?;
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", j.pid))
            .map_err(|e| AgentError::invalid(format!("{what}: process {}: {e}", j.pid)))?;
        let Some(other) = container_of_cgroup(&cgroup) else {
            return Err(AgentError::invalid(format!(
                "{what}: process {} is not a container process of this sandbox",
                j.pid
            )));
        };
        if !is_container(other) {
            return Err(AgentError::invalid(format!(
                "{what}: process {} is not a process of a container of this sandbox (cgroup of {other:?})",
                j.pid
            )));
        }
        let file = File::open(&j.path).map_err(|e| AgentError::invalid(format!("{what}: {e}")))?;
        let typ = ns_type(&file).map_err(|e| {
            AgentError::invalid(format!("{what}: not a namespace file ({})", e.desc()))
        })?;
        if typ != j.kind.clone_flag().bits() {
            return Err(AgentError::invalid(format!(
                "{what}: the file is a namespace of another type"
            )));
        }
        pidfd_alive(&pidfd).map_err(|e| {
            AgentError::invalid(format!(
                "{what}: process {} exited while its namespace was opened ({})",
                j.pid,
                e.desc()
            ))
        })?;
        out.push(OpenedNs { kind: j.kind, file });
    }
    Ok(out)
}

fn pidfd_open(pid: i32) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no pointers; a non-negative result is a new fd that nothing else owns.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = nix::errno::Errno::result(r)?;
    let fd = i32::try_from(fd).map_err(|_| nix::errno::Errno::EBADF)?;
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Signal 0 through a pidfd: Ok while the process has not exited.
fn pidfd_alive(pidfd: &OwnedFd) -> nix::Result<()> {
    crate::spawn::pidfd_signal(pidfd, 0)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::ESRCH)))
}

/// Joins the namespaces on the calling thread (`setns`). For pid this sets
/// the namespace of the thread's future children only, so call it on a
/// thread of its own that then spawns the container's init.
pub fn join_on_this_thread(cid: &str, opened: &[OpenedNs]) -> Result<()> {
    for ns in opened {
        nix::sched::setns(ns.file.as_fd(), ns.kind.clone_flag()).map_err(|e| {
            crate::error::sys_err(
                format!(
                    "container {cid:?}: join the {} namespace",
                    ns.kind.oci_name()
                ),
                e,
            )
        })?;
    }
    Ok(())
}

/// IPC sysctls runc accepts in a container with an ipc namespace (plus
/// `fs.mqueue.*`).
const IPC_SYSCTLS: &[&str] = &[
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Checks `linux.sysctl` like runc: IPC sysctls need an ipc namespace (its
/// own or the pod's), `kernel.domainname` a uts namespace, `kernel.hostname`
/// is the `hostname` field's job; `net.*` is always the pod's (the VM's
/// network namespace); anything else is not namespaced and would change the
/// whole VM, so it is refused.
pub fn check_sysctls(cid: &str, spec: &Spec, ns: &NamespacePlan) -> Result<()> {
    let sysctls = spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().clone())
        .unwrap_or_default();
    for key in sysctls.keys() {
        let bad =
            |why: &str| AgentError::invalid(format!("container {cid:?}: sysctl {key:?} {why}"));
        if key.is_empty() || key.contains('/') || key.split('.').any(|p| p.is_empty() || p == "..")
        {
            return Err(bad("is not a sysctl name"));
        }
        if IPC_SYSCTLS.contains(&key.as_str()) || key.starts_with("fs.mqueue.") {
            if ns.has(NsKind::Ipc) {
                continue;
            }
            return Err(bad(
                "is not allowed in the VM's ipc namespace (the spec has no ipc namespace)",
            ));
        }
        if key.starts_with("net.") {
            continue;
        }
        match key.as_str() {
            "kernel.domainname" if ns.has(NsKind::Uts) => continue,
            "kernel.hostname" if ns.has(NsKind::Uts) => {
                return Err(bad("conflicts with the OCI \"hostname\" field"))
            }
            _ => {}
        }
        return Err(bad("is not in a separate kernel namespace"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(namespaces: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"r"}},"linux":{{"namespaces":{namespaces}}}}}"#
        ))
        .unwrap()
    }

    fn flags(f: &[CloneFlags]) -> u64 {
        f.iter().fold(0, |a, f| a | f.bits() as u64)
    }

    #[test]
    fn new_namespaces_and_ignored_ones() {
        let p = plan(
            "c",
            &spec(
                r#"[{"type":"pid"},{"type":"ipc"},{"type":"uts"},{"type":"mount"},
                {"type":"network","path":"/var/run/netns/cni-1"},{"type":"cgroup"}]"#,
            ),
        )
        .unwrap();
        use CloneFlags as F;
        assert_eq!(
            p.new,
            flags(&[
                F::CLONE_NEWNS,
                F::CLONE_NEWPID,
                F::CLONE_NEWIPC,
                F::CLONE_NEWUTS,
                F::CLONE_NEWCGROUP
            ])
        );
        assert!(p.join.is_empty());
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("cni-1"));
        let p: NamespacePlan = plan(
            "c",
            &serde_json::from_str(r#"{"ociVersion":"1.0.2","root":{"path":"r"}}"#).unwrap(),
        )
        .unwrap();
        assert_eq!(p.new, flags(&[CloneFlags::CLONE_NEWNS]));
        assert!(!p.has(NsKind::Pid) && !p.has(NsKind::Ipc));
    }

    #[test]
    fn pod_namespaces_are_joined() {
        // What containerd's CRI gives a container of a pod (pid: POD mode).
        let p = plan(
            "app",
            &spec(
                r#"[{"type":"pid","path":"/proc/42/ns/pid"},{"type":"ipc","path":"/proc/42/ns/ipc"},
                {"type":"uts","path":"/proc/42/ns/uts"},{"type":"mount"},{"type":"network","path":"/proc/42/ns/net"}]"#,
            ),
        )
        .unwrap();
        assert_eq!(p.new, flags(&[CloneFlags::CLONE_NEWNS]));
        let kinds: Vec<(NsKind, i32)> = p.join.iter().map(|j| (j.kind, j.pid)).collect();
        assert_eq!(
            kinds,
            vec![(NsKind::Pid, 42), (NsKind::Ipc, 42), (NsKind::Uts, 42)]
        );
        assert!(p.has(NsKind::Pid) && p.has(NsKind::Ipc) && p.has(NsKind::Uts));
        assert!(!p.has(NsKind::Cgroup));
    }

    #[test]
    fn bad_paths_are_refused_with_container_type_and_path() {
        for (ns, want) in [
            (r#"{"type":"ipc","path":"/proc/42/ns/uts"}"#, "not \"ipc\""),
            (
                r#"{"type":"pid","path":"/proc/self/ns/pid"}"#,
                "not a process id",
            ),
            (
                r#"{"type":"pid","path":"/proc/0/ns/pid"}"#,
                "not a process id",
            ),
            (
                r#"{"type":"uts","path":"/var/run/netns/x"}"#,
                "/proc/<pid>/ns/<type>",
            ),
            (
                r#"{"type":"uts","path":"/proc/42/ns/uts/.."}"#,
                "/proc/<pid>/ns/<type>",
            ),
            (
                r#"{"type":"uts","path":"proc/42/ns/uts"}"#,
                "/proc/<pid>/ns/<type>",
            ),
            (
                r#"{"type":"uts","path":"/proc//42/ns/uts"}"#,
                "extra slashes",
            ),
            (
                r#"{"type":"ipc","path":"/proc/+4/ns/ipc"}"#,
                "not a process id",
            ),
            (
                r#"{"type":"mount","path":"/proc/42/ns/mnt"}"#,
                "not supported",
            ),
        ] {
            let e = plan("c7", &spec(&format!("[{ns}]"))).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{ns}");
            let m = e.to_string();
            assert!(m.contains("container \"c7\""), "{m}");
            assert!(m.contains(want), "{ns}: {m}");
            let typ: serde_json::Value = serde_json::from_str(ns).unwrap();
            assert!(m.contains(typ["type"].as_str().unwrap()), "{m}");
            assert!(m.contains(typ["path"].as_str().unwrap()), "{m}");
        }
        let e = plan("c", &spec(r#"[{"type":"user"}]"#)).unwrap_err();
        assert!(e.to_string().contains("user namespaces"));
        let e = plan(
            "c",
            &spec(r#"[{"type":"ipc"},{"type":"ipc","path":"/proc/2/ns/ipc"}]"#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn cgroup_file_owner() {
        assert_eq!(container_of_cgroup("0::/capsule/pod-a\n"), Some("pod-a"));
        assert_eq!(container_of_cgroup("0::/capsule/c1/sub\n"), Some("c1"));
        assert_eq!(container_of_cgroup("0::/\n"), None);
        assert_eq!(container_of_cgroup("0::/capsule\n"), None);
        assert_eq!(container_of_cgroup("0::/capsulex/c\n"), None);
        assert_eq!(container_of_cgroup(""), None);
    }

    #[test]
    fn sysctls_follow_runc() {
        let s = |ns: &str, sysctl: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion":"1.0.2","root":{{"path":"r"}},"linux":{{"namespaces":{ns},"sysctl":{sysctl}}}}}"#
            ))
            .unwrap()
        };
        let check = |ns: &str, sysctl: &str| {
            let spec = s(ns, sysctl);
            check_sysctls("c", &spec, &plan("c", &spec).unwrap())
        };
        let ipc_uts = r#"[{"type":"ipc"},{"type":"uts"}]"#;
        let joined = r#"[{"type":"ipc","path":"/proc/9/ns/ipc"}]"#;
        check(
            ipc_uts,
            r#"{"kernel.shm_rmid_forced":"1","fs.mqueue.msg_max":"100","net.ipv4.ip_forward":"1","kernel.domainname":"x"}"#,
        )
        .unwrap();
        check(joined, r#"{"kernel.shm_rmid_forced":"1"}"#).unwrap();
        check("[]", r#"{"net.core.somaxconn":"1024"}"#).unwrap();
        for (ns, sysctl, want) in [
            ("[]", r#"{"kernel.shm_rmid_forced":"1"}"#, "ipc namespace"),
            ("[]", r#"{"fs.mqueue.msg_max":"1"}"#, "ipc namespace"),
            (ipc_uts, r#"{"kernel.hostname":"h"}"#, "hostname"),
            ("[]", r#"{"kernel.domainname":"x"}"#, "not in a separate"),
            (ipc_uts, r#"{"vm.swappiness":"1"}"#, "not in a separate"),
            (ipc_uts, r#"{"net/../../x":"1"}"#, "not a sysctl name"),
            (ipc_uts, r#"{"net..x":"1"}"#, "not a sysctl name"),
        ] {
            let e = check(ns, sysctl).unwrap_err();
            assert!(e.to_string().contains(want), "{sysctl}: {e}");
            assert!(e.to_string().contains("container \"c\""), "{e}");
        }
    }
}
