//! Pure translation of the OCI spec into what the agent does: mounts to a
//! mount plan, rlimits and capabilities to numbers (namespaces: see
//! [`super::namespaces`]).
//! Nothing here touches the system, so it is all unit tested on the host.
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use oci_spec::runtime::{Mount, PosixRlimit, PosixRlimitType, Process, Spec};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};
use crate::paths::{is_clean_absolute, SHARED_DIR};

/// Parses the OCI spec JSON of container `cid`.
pub fn parse_spec(cid: &str, json: &[u8]) -> Result<Spec> {
    serde_json::from_slice(json).map_err(|e| AgentError::Json {
        what: format!("container {cid:?}: OCI spec is not valid"),
        source: e,
    })
}

/// Parses an OCI `Process` (exec requests), named for errors.
pub fn parse_process(what: &str, json: &[u8]) -> Result<Process> {
    let p: Process = serde_json::from_slice(json).map_err(|e| AgentError::Json {
        what: format!("{what}: OCI process is not valid"),
        source: e,
    })?;
    check_process(what, &p)?;
    Ok(p)
}

/// What every process needs before it can be started.
pub fn check_process(what: &str, p: &Process) -> Result<()> {
    match p.args() {
        Some(a) if !a.is_empty() && !a[0].is_empty() => {}
        _ => {
            return Err(AgentError::invalid(format!(
                "{what}: process.args is empty"
            )))
        }
    }
    if !p.cwd().is_absolute() {
        return Err(AgentError::invalid(format!(
            "{what}: process.cwd {:?} is not absolute",
            p.cwd()
        )));
    }
    for kv in p.env().iter().flatten() {
        if !kv.contains('=') || kv.contains('\0') {
            return Err(AgentError::invalid(format!(
                "{what}: env entry {kv:?} is not KEY=VALUE"
            )));
        }
    }
    if let Some(a) = p.args() {
        if a.iter().any(|s| s.contains('\0')) {
            return Err(AgentError::invalid(format!(
                "{what}: process.args contain a NUL byte"
            )));
        }
    }
    rlimits(what, p)?;
    Ok(())
}

/// Resolves `CreateContainerRequest.rootfs`: relative to [`SHARED_DIR`], or an
/// absolute path at or below one of `storage_mounts`.
pub fn resolve_rootfs(cid: &str, rootfs: &str, storage_mounts: &[PathBuf]) -> Result<PathBuf> {
    let p = Path::new(rootfs);
    let bad =
        |why: &str| AgentError::invalid(format!("container {cid:?}: rootfs {rootfs:?} {why}"));
    if rootfs.is_empty() {
        return Err(bad("is empty"));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(bad("contains '..'"));
    }
    if p.is_absolute() {
        if !is_clean_absolute(p) {
            return Err(bad("is not a clean path"));
        }
        if storage_mounts.iter().any(|m| p.starts_with(m)) || p.starts_with(SHARED_DIR) {
            return Ok(p.to_path_buf());
        }
        return Err(bad(
            "is not under the shared directory or a storage mount point",
        ));
    }
    Ok(Path::new(SHARED_DIR).join(p))
}

/// One mount of the plan, in spec order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountStep {
    pub destination: PathBuf,
    pub source: Option<PathBuf>,
    pub fstype: Option<String>,
    /// Flags for the first mount(2) (MS_BIND[|MS_REC] for binds).
    pub flags: u64,
    /// For binds with more flags: the MS_REMOUNT|MS_BIND flags to apply next.
    pub remount: Option<u64>,
    /// Propagation changes applied afterwards (MS_PRIVATE, MS_REC|MS_SLAVE...).
    pub propagation: Vec<u64>,
    pub data: String,
}

impl MountStep {
    pub fn is_bind(&self) -> bool {
        self.flags & MsFlags::MS_BIND.bits() != 0
    }
}

/// Parsed `options` of an OCI mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub propagation: Vec<MsFlags>,
    pub data: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            flags: MsFlags::empty(),
            propagation: Vec::new(),
            data: Vec::new(),
        }
    }
}

/// Splits mount options into mount(2) flags, propagation flags and fs data,
/// the way runc does.
pub fn parse_mount_options<S: AsRef<str>>(options: &[S]) -> MountOptions {
    let mut o = MountOptions::default();
    for opt in options {
        let opt = opt.as_ref();
        let (clear, set) = match opt {
            "defaults" => (false, MsFlags::empty()),
            "ro" => (false, MsFlags::MS_RDONLY),
            "rw" => (true, MsFlags::MS_RDONLY),
            "nosuid" => (false, MsFlags::MS_NOSUID),
            "suid" => (true, MsFlags::MS_NOSUID),
            "nodev" => (false, MsFlags::MS_NODEV),
            "dev" => (true, MsFlags::MS_NODEV),
            "noexec" => (false, MsFlags::MS_NOEXEC),
            "exec" => (true, MsFlags::MS_NOEXEC),
            "sync" => (false, MsFlags::MS_SYNCHRONOUS),
            "async" => (true, MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (false, MsFlags::MS_DIRSYNC),
            "remount" => (false, MsFlags::MS_REMOUNT),
            "mand" => (false, MsFlags::MS_MANDLOCK),
            "nomand" => (true, MsFlags::MS_MANDLOCK),
            "noatime" => (false, MsFlags::MS_NOATIME),
            "atime" => (true, MsFlags::MS_NOATIME),
            "nodiratime" => (false, MsFlags::MS_NODIRATIME),
            "diratime" => (true, MsFlags::MS_NODIRATIME),
            "bind" => (false, MsFlags::MS_BIND),
            "rbind" => (false, MsFlags::MS_BIND | MsFlags::MS_REC),
            "relatime" => (false, MsFlags::MS_RELATIME),
            "norelatime" => (true, MsFlags::MS_RELATIME),
            "strictatime" => (false, MsFlags::MS_STRICTATIME),
            "nostrictatime" => (true, MsFlags::MS_STRICTATIME),
            "silent" => (false, MsFlags::MS_SILENT),
            "loud" => (true, MsFlags::MS_SILENT),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let rec = if opt.starts_with('r') {
                    MsFlags::MS_REC
                } else {
                    MsFlags::empty()
                };
                let kind = match opt.trim_start_matches('r') {
                    "private" => MsFlags::MS_PRIVATE,
                    "shared" => MsFlags::MS_SHARED,
                    "slave" => MsFlags::MS_SLAVE,
                    _ => MsFlags::MS_UNBINDABLE,
                };
                o.propagation.push(kind | rec);
                continue;
            }
            // runc extension handled elsewhere (or not at all) here.
            "tmpcopyup" | "rro" | "idmap" | "ridmap" => continue,
            other => {
                o.data.push(other.to_string());
                continue;
            }
        };
        if clear {
            o.flags.remove(set);
        } else {
            o.flags.insert(set);
        }
    }
    o
}

/// The mount plan of a spec. Bind sources must be guest paths: absolute, or
/// relative to [`SHARED_DIR`] (the shim rewrites host paths to share paths).
pub fn mount_plan(cid: &str, mounts: &[Mount]) -> Result<Vec<MountStep>> {
    mounts.iter().map(|m| mount_step(cid, m)).collect()
}

fn mount_step(cid: &str, m: &Mount) -> Result<MountStep> {
    let dest = m.destination();
    let bad = |why: String| {
        AgentError::invalid(format!(
            "container {cid:?}: mount at {}: {why}",
            dest.display()
        ))
    };
    if !dest.is_absolute() {
        return Err(bad("destination is not absolute".into()));
    }
    if dest.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(bad("destination contains a NUL byte".into()));
    }
    let opts = parse_mount_options(m.options().as_deref().unwrap_or(&[]));
    let fstype = m.typ().clone().filter(|t| !t.is_empty() && t != "none");
    let is_bind = opts.flags.contains(MsFlags::MS_BIND) || fstype.as_deref() == Some("bind");
    let mut source = m.source().clone();
    let data = opts.data.join(",");
    if is_bind {
        let src = source
            .take()
            .ok_or_else(|| bad("bind mount without a source".into()))?;
        let src = if src.is_absolute() {
            src
        } else if crate::paths::is_plain_relative(&src) {
            Path::new(SHARED_DIR).join(src)
        } else {
            return Err(bad(format!(
                "bind source {} escapes the shared directory",
                src.display()
            )));
        };
        let first = MsFlags::MS_BIND | (opts.flags & MsFlags::MS_REC);
        let rest = opts.flags - (MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        return Ok(MountStep {
            destination: dest.clone(),
            source: Some(src),
            fstype: None,
            flags: first.bits(),
            remount: (!rest.is_empty())
                .then(|| (rest | MsFlags::MS_REMOUNT | MsFlags::MS_BIND).bits()),
            propagation: opts.propagation.iter().map(|f| f.bits()).collect(),
            data,
        });
    }
    let Some(fstype) = fstype else {
        return Err(bad("no filesystem type and not a bind mount".into()));
    };
    Ok(MountStep {
        destination: dest.clone(),
        source: source.or_else(|| Some(PathBuf::from(&fstype))),
        fstype: Some(fstype),
        flags: opts.flags.bits(),
        remount: None,
        propagation: opts.propagation.iter().map(|f| f.bits()).collect(),
        data,
    })
}

/// `(resource, soft, hard)` for setrlimit, checking soft <= hard and duplicates.
pub fn rlimits(what: &str, p: &Process) -> Result<Vec<(i32, u64, u64)>> {
    let mut out: Vec<(i32, u64, u64)> = Vec::new();
    for r in p.rlimits().iter().flatten() {
        let (res, soft, hard) = rlimit(r);
        if soft > hard {
            return Err(AgentError::invalid(format!(
                "{what}: rlimit {:?}: soft {soft} above hard {hard}",
                r.typ()
            )));
        }
        if out.iter().any(|(x, _, _)| *x == res) {
            return Err(AgentError::invalid(format!(
                "{what}: rlimit {:?} given twice",
                r.typ()
            )));
        }
        out.push((res, soft, hard));
    }
    Ok(out)
}

fn rlimit(r: &PosixRlimit) -> (i32, u64, u64) {
    let res = match r.typ() {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    };
    (res as i32, r.soft(), r.hard())
}

/// Linux capability numbers, by OCI name without the `CAP_` prefix.
pub const CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The capability sets of a process as bitmasks. `None` when the process has
/// no `capabilities` (then nothing is dropped, like runc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

pub fn cap_number(name: &str) -> Option<u32> {
    let n = name.strip_prefix("CAP_").unwrap_or(name);
    CAPS.iter().position(|c| *c == n).map(|i| i as u32)
}

pub fn cap_sets(what: &str, p: &Process) -> Result<Option<CapSets>> {
    let Some(caps) = p.capabilities() else {
        return Ok(None);
    };
    let mask = |set: &Option<oci_spec::runtime::Capabilities>| -> Result<u64> {
        let mut m = 0u64;
        for c in set.iter().flatten() {
            // The serde form is the kernel name ("CAP_SYS_ADMIN").
            let name = serde_json::to_value(c)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            match cap_number(&name) {
                Some(n) => m |= 1 << n,
                None => {
                    return Err(AgentError::invalid(format!(
                        "{what}: unknown capability {c:?}"
                    )))
                }
            }
        }
        Ok(m)
    };
    Ok(Some(CapSets {
        bounding: mask(caps.bounding())?,
        effective: mask(caps.effective())?,
        permitted: mask(caps.permitted())?,
        inheritable: mask(caps.inheritable())?,
        ambient: mask(caps.ambient())?,
    }))
}

/// Highest capability number this agent knows.
pub fn last_cap() -> u32 {
    CAPS.len() as u32 - 1
}

/// `KEY=VALUE` lookup in an OCI env list.
pub fn env_get<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Where `execvp` would find `arg0`: as is when it has a '/', else the first
/// candidate in `PATH` (from the process env, default like runc's).
pub fn exec_candidates(arg0: &str, env: &[String]) -> Vec<PathBuf> {
    if arg0.contains('/') {
        return vec![PathBuf::from(arg0)];
    }
    let path = env_get(env, "PATH")
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(arg0))
        .collect()
}

/// The exit status reported by WaitProcess: the exit code, or 128 + signal.
pub fn exit_status(status: nix::sys::wait::WaitStatus) -> Option<i32> {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::sys::wait::WaitStatus;
    use nix::unistd::Pid;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn options_split_like_runc() {
        let o = parse_mount_options(&[
            "nosuid",
            "noexec",
            "ro",
            "rw",
            "mode=755",
            "size=65536k",
            "rslave",
        ]);
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC);
        assert_eq!(o.data, vec!["mode=755", "size=65536k"]);
        assert_eq!(o.propagation, vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]);
        let o = parse_mount_options(&["rbind", "ro"]);
        assert_eq!(
            o.flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY
        );
    }

    #[test]
    fn mount_plan_binds_and_filesystems() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"mounts":[
            {"destination":"/proc","type":"proc","source":"proc"},
            {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]},
            {"destination":"/etc/hosts","type":"bind","source":"c1/hosts","options":["rbind","ro"]},
            {"destination":"/data","source":"/run/capsule/storage/v","options":["bind","nodev"]}]}"#,
        );
        let plan = mount_plan("c1", s.mounts().as_ref().unwrap()).unwrap();
        assert_eq!(plan[0].fstype.as_deref(), Some("proc"));
        assert_eq!(plan[0].flags, 0);
        assert_eq!(plan[1].data, "mode=755,size=65536k");
        assert_eq!(
            plan[1].flags,
            (MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME).bits()
        );
        assert!(plan[2].is_bind());
        assert_eq!(
            plan[2].source.as_deref(),
            Some(Path::new("/run/capsule/shared/c1/hosts"))
        );
        assert_eq!(plan[2].flags, (MsFlags::MS_BIND | MsFlags::MS_REC).bits());
        assert_eq!(
            plan[2].remount,
            Some((MsFlags::MS_RDONLY | MsFlags::MS_REMOUNT | MsFlags::MS_BIND).bits())
        );
        assert!(plan[3].is_bind());
        assert_eq!(
            plan[3].remount,
            Some((MsFlags::MS_NODEV | MsFlags::MS_REMOUNT | MsFlags::MS_BIND).bits())
        );
    }

    #[test]
    fn mount_plan_rejects_bad_mounts() {
        for m in [
            r#"{"destination":"rel","type":"tmpfs"}"#,
            r#"{"destination":"/x","options":["bind"]}"#,
            r#"{"destination":"/x","source":"../../etc","options":["bind"]}"#,
            r#"{"destination":"/x","source":"foo"}"#,
        ] {
            let m: Mount = serde_json::from_str(m).unwrap();
            let e = mount_plan("c9", &[m]).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
            assert!(e.to_string().contains("container \"c9\""), "{e}");
        }
    }

    #[test]
    fn rootfs_resolution() {
        let mounts = vec![PathBuf::from("/run/capsule/storage/blk0")];
        assert_eq!(
            resolve_rootfs("c", "c/rootfs", &mounts).unwrap(),
            Path::new("/run/capsule/shared/c/rootfs")
        );
        assert_eq!(
            resolve_rootfs("c", "/run/capsule/storage/blk0/rootfs", &mounts).unwrap(),
            Path::new("/run/capsule/storage/blk0/rootfs")
        );
        for bad in [
            "",
            "../x",
            "c/../../x",
            "/etc",
            "/run/capsule/storage/other",
        ] {
            assert!(resolve_rootfs("c", bad, &mounts).is_err(), "{bad}");
        }
    }

    #[test]
    fn rlimits_and_process_checks() {
        let p: Process = serde_json::from_str(
            r#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0},
            "rlimits":[{"type":"RLIMIT_NOFILE","soft":1024,"hard":4096},{"type":"RLIMIT_CORE","soft":0,"hard":0}]}"#,
        )
        .unwrap();
        let r = rlimits("p", &p).unwrap();
        assert_eq!(
            r,
            vec![
                (libc::RLIMIT_NOFILE as i32, 1024, 4096),
                (libc::RLIMIT_CORE as i32, 0, 0)
            ]
        );
        for bad in [
            r#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0},"rlimits":[{"type":"RLIMIT_NOFILE","soft":9,"hard":1}]}"#,
            r#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0},"rlimits":[{"type":"RLIMIT_CORE"},{"type":"RLIMIT_CORE"}]}"#,
            r#"{"cwd":"/","args":[],"user":{"uid":0,"gid":0}}"#,
            r#"{"cwd":"rel","args":["sh"],"user":{"uid":0,"gid":0}}"#,
            r#"{"cwd":"/","args":["sh"],"env":["NOEQUALS"],"user":{"uid":0,"gid":0}}"#,
        ] {
            assert!(
                parse_process("exec \"e\"", bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
        assert!(parse_process("p", b"{not json").is_err());
    }

    #[test]
    fn capabilities_to_masks() {
        assert_eq!(cap_number("CAP_CHOWN"), Some(0));
        assert_eq!(cap_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(cap_number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(last_cap(), 40);
        let p: Process = serde_json::from_str(
            r#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0},"capabilities":{
            "bounding":["CAP_KILL","CAP_NET_BIND_SERVICE"],"effective":["CAP_KILL"]}}"#,
        )
        .unwrap();
        let c = cap_sets("p", &p).unwrap().unwrap();
        assert_eq!(c.bounding, (1 << 5) | (1 << 10));
        assert_eq!(c.effective, 1 << 5);
        assert_eq!(c.ambient, 0);
    }

    #[test]
    fn exit_status_mapping() {
        let pid = Pid::from_raw(10);
        assert_eq!(exit_status(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit_status(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            exit_status(WaitStatus::Signaled(pid, Signal::SIGTERM, true)),
            Some(143)
        );
        assert_eq!(exit_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn path_lookup() {
        let env = vec!["PATH=/bin:/usr/bin".to_string(), "X=1".to_string()];
        assert_eq!(env_get(&env, "X"), Some("1"));
        assert_eq!(env_get(&env, "PAT"), None);
        assert_eq!(
            exec_candidates("sh", &env),
            vec![PathBuf::from("/bin/sh"), PathBuf::from("/usr/bin/sh")]
        );
        assert_eq!(exec_candidates("./a", &env), vec![PathBuf::from("./a")]);
        assert_eq!(exec_candidates("ls", &[]).len(), 6);
    }
}
