//! OCI seccomp (`linux.seccomp`) through libseccomp, the library runc uses:
//! the same syscall tables (names resolved per architecture, x86 and x32
//! included), the same BPF, the same treatment of names this kernel's
//! architecture does not have (skipped). The agent links it statically
//! (`agent/build-static.sh`).
//!
//! [`compile`] turns a profile into a filter (checked at CreateContainer,
//! so a bad profile fails the request); the container process loads it
//! with [`Filter::load`] where runc does: before dropping capabilities
//! when `noNewPrivileges` is off (loading then needs CAP_SYS_ADMIN), else
//! right before execve.
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};

/// What is wrong with a profile, or what libseccomp refused.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: SCMP_ACT_NOTIFY{where_} is not supported (no seccomp agent in the guest)")]
    Notify { where_: String },
    #[error("seccomp: flag {flag} is not supported")]
    Flag { flag: String },
    #[error("seccomp: architecture {arch} is not known to libseccomp")]
    Arch { arch: String },
    #[error("seccomp: syscall {name}: argument index {index} is above 5")]
    ArgIndex { name: String, index: usize },
    #[error("seccomp: errno {errno} is out of range (0..=65535)")]
    Errno { errno: u32 },
    #[error("seccomp: {what}: {source}")]
    Lib {
        what: String,
        #[source]
        source: libseccomp::error::SeccompError,
    },
}

fn lib(what: impl Into<String>) -> impl FnOnce(libseccomp::error::SeccompError) -> SeccompError {
    let what = what.into();
    move |source| SeccompError::Lib { what, source }
}

/// A compiled profile, ready to load.
pub struct Filter {
    ctx: ScmpFilterContext,
    /// Names of the profile this architecture does not have (skipped).
    pub skipped: Vec<String>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("skipped", &self.skipped)
            .finish_non_exhaustive()
    }
}

impl Filter {
    /// Loads the filter into the calling thread (all threads with
    /// SECCOMP_FILTER_FLAG_TSYNC). Does not set no_new_privs.
    pub fn load(&self) -> Result<(), SeccompError> {
        self.ctx.load().map_err(lib("load the filter"))
    }

    /// The BPF program, as the kernel gets it (tests).
    pub fn export_bpf(&self, to: &std::fs::File) -> Result<(), SeccompError> {
        self.ctx.export_bpf(to).map_err(lib("export the filter"))
    }
}

/// The libseccomp action of an OCI action (`errno` for ERRNO and TRACE,
/// default EPERM like runc).
pub fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, SeccompError> {
    let errno = errno.unwrap_or(libc::EPERM as u32);
    let code = u16::try_from(errno).map_err(|_| SeccompError::Errno { errno })?;
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(i32::from(code)),
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(code),
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::Notify {
                where_: String::new(),
            })
        }
    })
}

fn compare_op(name: &str, a: &LinuxSeccompArg) -> Result<ScmpArgCompare, SeccompError> {
    if a.index() > 5 {
        return Err(SeccompError::ArgIndex {
            name: name.to_string(),
            index: a.index(),
        });
    }
    let op = match a.op() {
        LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
        LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
        LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
        LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
        LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
        LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
        // value is the mask, valueTwo the datum (runc, libseccomp-golang).
        // The runtime spec's valueTwo is `omitempty`: absent means 0, as in
        // containerd's default profile for clone (`arg0 & mask == 0`).
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            return Ok(ScmpArgCompare::new(
                a.index() as u32,
                ScmpCompareOp::MaskedEqual(a.value()),
                a.value_two().unwrap_or(0),
            ));
        }
    };
    Ok(ScmpArgCompare::new(a.index() as u32, op, a.value()))
}

/// The OCI name of an enum value (its JSON string).
fn oci_name<T: serde::Serialize + std::fmt::Debug>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{v:?}"))
}

/// Compiles an OCI profile. Unknown syscall names are skipped (listed in
/// [`Filter::skipped`]); a rule whose action is the default action adds
/// nothing (libseccomp refuses it); conditions on one argument index given
/// more than once become one rule each (OR), like runc.
pub fn compile(p: &LinuxSeccomp) -> Result<Filter, SeccompError> {
    let default = action(p.default_action(), p.default_errno_ret()).map_err(|e| match e {
        SeccompError::Notify { .. } => SeccompError::Notify {
            where_: " as the default action".into(),
        },
        e => e,
    })?;
    let mut ctx = ScmpFilterContext::new(default).map_err(lib("new filter"))?;
    // no_new_privs is the spec's business (noNewPrivileges), not the filter's.
    ctx.set_ctl_nnp(false)
        .map_err(lib("no_new_privs attribute"))?;
    for arch in p.architectures().iter().flatten() {
        let name = oci_name(arch);
        let a: ScmpArch = name
            .parse()
            .map_err(|_| SeccompError::Arch { arch: name.clone() })?;
        ctx.add_arch(a)
            .map_err(lib(format!("architecture {name}")))?;
    }
    for flag in p.flags().iter().flatten() {
        match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => {
                ctx.set_ctl_tsync(true).map_err(lib("flag TSYNC"))?;
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => {
                ctx.set_ctl_log(true).map_err(lib("flag LOG"))?;
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                ctx.set_ctl_ssb(true).map_err(lib("flag SPEC_ALLOW"))?;
            }
            other => {
                return Err(SeccompError::Flag {
                    flag: oci_name(other),
                })
            }
        }
    }
    let mut skipped = Vec::new();
    for rule in p.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret()).map_err(|e| match e {
            SeccompError::Notify { .. } => SeccompError::Notify {
                where_: format!(" for {}", rule.names().join(",")),
            },
            e => e,
        })?;
        if act == default {
            continue;
        }
        let args = rule.args().clone().unwrap_or_default();
        for name in rule.names() {
            let Ok(nr) = ScmpSyscall::from_name(name) else {
                skipped.push(name.clone());
                continue;
            };
            let conds = args
                .iter()
                .map(|a| compare_op(name, a))
                .collect::<Result<Vec<_>, _>>()?;
            let what = || format!("syscall {name}");
            let mut per_index = [0u8; 6];
            for a in &args {
                per_index[a.index()] += 1;
            }
            if conds.is_empty() {
                ctx.add_rule(act, nr).map_err(lib(what()))?;
            } else if per_index.iter().any(|n| *n > 1) {
                for c in conds {
                    ctx.add_rule_conditional(act, nr, &[c])
                        .map_err(lib(what()))?;
                }
            } else {
                ctx.add_rule_conditional(act, nr, &conds)
                    .map_err(lib(what()))?;
            }
        }
    }
    Ok(Filter { ctx, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    /// A classic-BPF interpreter for the instructions libseccomp emits, to
    /// check what a compiled filter returns for a syscall.
    fn run_bpf(prog: &[u8], nr: i32, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&nr.to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        for a in args {
            data.extend_from_slice(&a.to_le_bytes());
        }
        let insns: Vec<(u16, u8, u8, u32)> = prog
            .chunks_exact(8)
            .map(|c| {
                (
                    u16::from_le_bytes([c[0], c[1]]),
                    c[2],
                    c[3],
                    u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect();
        let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
        let mut pc = 0usize;
        loop {
            let (code, jt, jf, k) = insns[pc];
            pc += 1;
            let jump = |cond: bool| if cond { jt as usize } else { jf as usize };
            match code {
                0x20 => {
                    let o = k as usize;
                    a = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                0x00 => a = k,
                0x01 => x = k,
                0x60 => a = mem[k as usize],
                0x61 => x = mem[k as usize],
                0x02 => mem[k as usize] = a,
                0x03 => mem[k as usize] = x,
                0x54 => a &= k,
                0x44 => a |= k,
                0x07 => x = a,
                0x87 => a = x,
                0x05 => pc += k as usize,
                0x15 => pc += jump(a == k),
                0x25 => pc += jump(a > k),
                0x35 => pc += jump(a >= k),
                0x45 => pc += jump(a & k != 0),
                0x1d => pc += jump(a == x),
                0x2d => pc += jump(a > x),
                0x3d => pc += jump(a >= x),
                0x06 => return k,
                0x16 => return a,
                other => panic!("BPF opcode {other:#x} not interpreted"),
            }
        }
    }

    const X86_64: u32 = 0xc000_003e;
    const I386: u32 = 0x4000_0003;
    const ALLOW: u32 = 0x7fff_0000;
    const KILL_PROCESS: u32 = 0x8000_0000;
    const TRAP: u32 = 0x0003_0000;
    const LOG: u32 = 0x7ffc_0000;
    fn errno(e: i32) -> u32 {
        0x0005_0000 | e as u32
    }
    fn trace(v: u32) -> u32 {
        0x7ff0_0000 | v
    }

    fn bpf(json: &str) -> (Vec<u8>, Vec<String>) {
        let p: LinuxSeccomp = serde_json::from_str(json).unwrap();
        let f = compile(&p).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        f.export_bpf(&file).unwrap();
        file.rewind().unwrap();
        let mut prog = Vec::new();
        file.read_to_end(&mut prog).unwrap();
        (prog, f.skipped)
    }

    fn nr(name: &str) -> i32 {
        i32::from(ScmpSyscall::from_name(name).unwrap())
    }

    #[test]
    fn actions_errno_defaults_and_unknown_names() {
        let (prog, skipped) = bpf(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,"syscalls":[
            {"names":["getpid","no_such_syscall_xyz"],"action":"SCMP_ACT_ALLOW"},
            {"names":["sethostname"],"action":"SCMP_ACT_ERRNO"},
            {"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":5},
            {"names":["getuid"],"action":"SCMP_ACT_KILL_PROCESS"},
            {"names":["getgid"],"action":"SCMP_ACT_TRAP"},
            {"names":["geteuid"],"action":"SCMP_ACT_LOG"},
            {"names":["getegid"],"action":"SCMP_ACT_TRACE","errnoRet":7},
            {"names":["gettid"],"action":"SCMP_ACT_KILL"},
            {"names":["getpgrp"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}"#,
        );
        assert_eq!(skipped, vec!["no_such_syscall_xyz"]);
        let r = |name: &str| run_bpf(&prog, nr(name), X86_64, [0; 6]);
        assert_eq!(r("getpid"), ALLOW);
        assert_eq!(r("sethostname"), errno(libc::EPERM));
        assert_eq!(r("getppid"), errno(5));
        assert_eq!(r("getuid"), KILL_PROCESS);
        assert_eq!(r("getgid"), TRAP);
        assert_eq!(r("geteuid"), LOG);
        assert_eq!(r("getegid"), trace(7));
        assert_eq!(r("gettid"), 0, "SCMP_ACT_KILL is KILL_THREAD");
        assert_eq!(r("getpgrp"), errno(38), "same as the default: no rule");
        assert_eq!(r("read"), errno(38), "defaultErrnoRet");
        // Another architecture than the filter's: the kernel kills it.
        assert_eq!(run_bpf(&prog, 20, I386, [0; 6]), 0);
    }

    /// The shape of containerd's RuntimeDefault profile: many names, x86
    /// and x32 architectures, `personality` and `clone` (MASKED_EQ) and
    /// `socket` argument rules.
    #[test]
    fn runtime_default_shape() {
        let (prog, skipped) = bpf(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
            "syscalls":[
            {"names":["accept","accept4","access","brk","close","execve","exit_group","getpid","read","write",
                      "mmap","openat","rt_sigaction","clock_gettime64","some_future_syscall"],"action":"SCMP_ACT_ALLOW"},
            {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"}]},
            {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
            {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":4294967295,"op":"SCMP_CMP_EQ"}]},
            {"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]},
            {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
            {"names":["socket"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":40,"op":"SCMP_CMP_NE"}]},
            {"names":["socket"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":16,"op":"SCMP_CMP_EQ"},{"index":2,"value":9,"op":"SCMP_CMP_EQ"}]},
            {"names":["socket"],"action":"SCMP_ACT_ALLOW","args":[{"index":2,"value":9,"op":"SCMP_CMP_NE"}]}
            ]}"#,
        );
        // clock_gettime64 exists on x86 only; the future name nowhere.
        assert!(
            skipped.contains(&"some_future_syscall".to_string()),
            "{skipped:?}"
        );
        let r = |name: &str, args: [u64; 6]| run_bpf(&prog, nr(name), X86_64, args);
        let eperm = errno(libc::EPERM);
        assert_eq!(r("read", [0; 6]), ALLOW);
        assert_eq!(r("sethostname", [0; 6]), eperm);
        assert_eq!(r("personality", [8, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(r("personality", [0xffff_ffff, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(r("personality", [1, 0, 0, 0, 0, 0]), eperm);
        // clone without namespace flags (CLONE_NEW* mask 0x7E020000).
        let fork_flags = (libc::CLONE_VM | libc::CLONE_FS | libc::SIGCHLD) as u64;
        assert_eq!(r("clone", [fork_flags, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(
            r(
                "clone",
                [fork_flags | libc::CLONE_NEWNS as u64, 0, 0, 0, 0, 0]
            ),
            eperm
        );
        assert_eq!(
            r("clone", [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]),
            eperm
        );
        assert_eq!(r("clone3", [0; 6]), errno(libc::ENOSYS));
        // AF_NETLINK (16) only with NETLINK_AUDIT (9) refused; AF_VSOCK (40) never.
        assert_eq!(r("socket", [2, 1, 0, 0, 0, 0]), ALLOW);
        assert_eq!(r("socket", [16, 3, 0, 0, 0, 0]), ALLOW);
        assert_eq!(
            r("socket", [16, 3, 9, 0, 0, 0]),
            ALLOW,
            "AF_NETLINK/NETLINK_AUDIT is allowed by rule 2"
        );
        assert_eq!(r("socket", [40, 1, 9, 0, 0, 0]), eperm);
        // The 32-bit x86 table: getpid is 20 there, and allowed.
        assert_eq!(run_bpf(&prog, 20, I386, [0; 6]), ALLOW);
        // x32: its syscall numbers carry bit 30.
        assert_eq!(
            run_bpf(&prog, 0x4000_0000 | nr("read"), X86_64, [0; 6]),
            ALLOW
        );
    }

    #[test]
    fn repeated_argument_index_is_an_or() {
        let (prog, _) = bpf(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["kill"],"action":"SCMP_ACT_ERRNO",
            "args":[{"index":1,"value":9,"op":"SCMP_CMP_EQ"},{"index":1,"value":15,"op":"SCMP_CMP_EQ"}]},
            {"names":["dup"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":100,"op":"SCMP_CMP_GT"}]},
            {"names":["dup2"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":3,"op":"SCMP_CMP_LT"},{"index":1,"value":10,"op":"SCMP_CMP_GE"}]}]}"#,
        );
        let r = |name: &str, args: [u64; 6]| run_bpf(&prog, nr(name), X86_64, args);
        assert_eq!(r("kill", [1, 9, 0, 0, 0, 0]), errno(libc::EPERM));
        assert_eq!(r("kill", [1, 15, 0, 0, 0, 0]), errno(libc::EPERM));
        assert_eq!(r("kill", [1, 2, 0, 0, 0, 0]), ALLOW);
        assert_eq!(r("dup", [101, 0, 0, 0, 0, 0]), errno(libc::EPERM));
        assert_eq!(r("dup", [100, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(
            r("dup", [1 << 40, 0, 0, 0, 0, 0]),
            errno(libc::EPERM),
            "64-bit compare"
        );
        assert_eq!(
            r("dup2", [2, 10, 0, 0, 0, 0]),
            errno(libc::EPERM),
            "both hold (AND)"
        );
        assert_eq!(r("dup2", [2, 9, 0, 0, 0, 0]), ALLOW);
        assert_eq!(r("dup2", [3, 10, 0, 0, 0, 0]), ALLOW);
    }

    #[test]
    fn refused_profiles() {
        for (json, want) in [
            (
                r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#,
                "NOTIFY as the default action",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["ioctl"],"action":"SCMP_ACT_NOTIFY"}]}"#,
                "NOTIFY for ioctl",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]}"#,
                "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
                "index 6",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":70000}"#,
                "70000",
            ),
        ] {
            let p: LinuxSeccomp = serde_json::from_str(json).unwrap();
            let e = compile(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
        let p: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_TSYNC","SECCOMP_FILTER_FLAG_LOG","SECCOMP_FILTER_FLAG_SPEC_ALLOW"],"architectures":["SCMP_ARCH_AARCH64"]}"#,
        )
        .unwrap();
        compile(&p).unwrap();
        // valueTwo omitted (Go's omitempty of 0), as containerd 1.6 sends
        // its default profile's clone rule.
        let p: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":2114060288,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
        )
        .unwrap();
        compile(&p).unwrap();
    }
}
