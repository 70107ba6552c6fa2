//! Signals to container processes, and the signal state a container process
//! starts with.
//!
//! **Why a stop signal can be lost.** A container with its own pid
//! namespace runs its process as PID 1 of that namespace, and the kernel
//! discards every signal sent to a namespace init whose disposition is
//! `SIG_DFL` (`sig_task_ignored()`: `SIGNAL_UNKILLABLE` and the default
//! handler), wherever it comes from; only SIGKILL and SIGSTOP from an
//! ancestor namespace get through. So SIGTERM to a shell that does not trap
//! it, or to a program that has not installed its handler *yet*, vanishes.
//! StartContainer returns as soon as the process has exec'd, before the
//! program ran a line of its own; CRI stops `top` milliseconds later, and
//! under TCG the guest needs longer than that to get `top` to its
//! `signal()` calls. runc has the same rule (a SIGTERM during
//! `sh -c "sleep 3; exec top"` is lost there too); it only wins the race
//! on a fast host.
//!
//! The agent therefore sends SIGKILL instead when the target is the init of
//! its pid namespace, the signal's default action would end the process,
//! and the process neither catches, ignores nor blocks it (its
//! `/proc/<pid>/status`): the kernel would drop the signal, and what the
//! sender asked for is the end of the process. A process that handles the
//! signal (or blocks it, e.g. to `sigwait` for it) gets the signal itself.
//! Kata's agent does the same for SIGTERM.

/// What `/proc/<pid>/status` says about a process's signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SignalState {
    /// PID 1 of its innermost pid namespace (last `NSpid` field).
    pub ns_init: bool,
    /// `SigBlk`, `SigIgn`, `SigCgt`: bit `n - 1` is signal `n`.
    pub blocked: u64,
    pub ignored: u64,
    pub caught: u64,
}

/// Parses the fields of `/proc/<pid>/status` that matter; `None` when one
/// is missing or malformed.
pub fn parse_status(status: &str) -> Option<SignalState> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let mask = |name: &str| u64::from_str_radix(field(name)?, 16).ok();
    let nspid = field("NSpid")?;
    Some(SignalState {
        ns_init: nspid.split_whitespace().last()? == "1",
        blocked: mask("SigBlk")?,
        ignored: mask("SigIgn")?,
        caught: mask("SigCgt")?,
    })
}

/// True when the default action of `sig` ends the process (terminate or
/// core dump): everything but SIGCHLD, SIGCONT, SIGURG, SIGWINCH (ignored
/// by default) and the stop signals. Real-time signals terminate.
pub fn default_terminates(sig: i32) -> bool {
    (1..=libc::SIGRTMAX()).contains(&sig)
        && !matches!(
            sig,
            libc::SIGCHLD
                | libc::SIGCONT
                | libc::SIGURG
                | libc::SIGWINCH
                | libc::SIGSTOP
                | libc::SIGTSTP
                | libc::SIGTTIN
                | libc::SIGTTOU
        )
}

/// The signal to send for `sig`: SIGKILL when the kernel would discard
/// `sig` (see the module documentation), else `sig`.
pub fn effective_signal(sig: i32, state: &SignalState) -> i32 {
    if sig == libc::SIGKILL || !state.ns_init || !default_terminates(sig) {
        return sig;
    }
    let bit = 1u64 << (sig - 1);
    if (state.blocked | state.ignored | state.caught) & bit != 0 {
        return sig;
    }
    libc::SIGKILL
}

/// Resets the calling process to the signal state a new container process
/// gets from runc: every catchable signal at `SIG_DFL` (the agent's Rust
/// runtime ignores SIGPIPE, and ignored dispositions survive execve) and
/// an empty signal mask. Run in the single-threaded container child right
/// before it execs.
pub fn reset_for_exec() -> Result<(), String> {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        set_default(sig).map_err(|e| format!("reset the disposition of signal {sig}: {e}"))?;
    }
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .map_err(|e| format!("clear the signal mask: {}", e.desc()))
}

/// The kernel's `struct sigaction` on x86_64 (glibc's differs, and glibc's
/// `sigaction()` refuses the signals it reserves, 32 and 33, whose
/// disposition would still survive execve).
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// `rt_sigaction(sig, SIG_DFL)`.
fn set_default(sig: i32) -> std::io::Result<()> {
    let act = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: `act` is a valid kernel sigaction for the duration of the call (SIG_DFL, no flags, empty mask); the old-action pointer is null and the size is the kernel's sigset size (8 bytes).
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            &act as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            std::mem::size_of::<u64>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SH_AS_INIT: &str = "Name:\tsh\nNSpid:\t312\t1\nSigQ:\t0/1830\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000004\nSigCgt:\t0000000000010002\n";

    #[test]
    fn status_fields() {
        let s = parse_status(SH_AS_INIT).unwrap();
        assert!(s.ns_init);
        assert_eq!(s.ignored, 1 << (libc::SIGQUIT - 1));
        assert_eq!(
            s.caught,
            (1 << (libc::SIGINT - 1)) | (1 << (libc::SIGCHLD - 1))
        );
        let not_init = SH_AS_INIT.replace("NSpid:\t312\t1", "NSpid:\t312\t7");
        assert!(!parse_status(&not_init).unwrap().ns_init);
        let host = SH_AS_INIT.replace("NSpid:\t312\t1", "NSpid:\t1");
        assert!(parse_status(&host).unwrap().ns_init);
        assert_eq!(parse_status("Name:\tx\n"), None);
        assert_eq!(
            parse_status(&SH_AS_INIT.replace("0000000000010002", "zz")),
            None
        );
    }

    #[test]
    fn unhandled_stop_signal_to_a_namespace_init_becomes_sigkill() {
        let sh = parse_status(SH_AS_INIT).unwrap();
        // sh -c "sleep 3; exec top", during the sleep: SIGTERM would be dropped.
        assert_eq!(effective_signal(libc::SIGTERM, &sh), libc::SIGKILL);
        assert_eq!(effective_signal(libc::SIGHUP, &sh), libc::SIGKILL);
        assert_eq!(effective_signal(libc::SIGRTMIN() + 2, &sh), libc::SIGKILL);
        // Caught (SIGINT), ignored (SIGQUIT), default-ignored or stop signals: as asked.
        assert_eq!(effective_signal(libc::SIGINT, &sh), libc::SIGINT);
        assert_eq!(effective_signal(libc::SIGQUIT, &sh), libc::SIGQUIT);
        for sig in [
            libc::SIGCHLD,
            libc::SIGWINCH,
            libc::SIGCONT,
            libc::SIGSTOP,
            libc::SIGTSTP,
            0,
        ] {
            assert_eq!(effective_signal(sig, &sh), sig, "{sig}");
        }
        // top after its signal() calls: SIGTERM is caught.
        let top = SignalState {
            caught: 0x3807a27,
            ..sh
        };
        assert_eq!(effective_signal(libc::SIGTERM, &top), libc::SIGTERM);
        // Blocked (sigwait): it stays pending for the process.
        let waiter = SignalState {
            blocked: 1 << (libc::SIGTERM - 1),
            ..sh
        };
        assert_eq!(effective_signal(libc::SIGTERM, &waiter), libc::SIGTERM);
        // Not a namespace init (the pod's pid namespace): the kernel delivers it.
        let member = SignalState {
            ns_init: false,
            ..sh
        };
        assert_eq!(effective_signal(libc::SIGTERM, &member), libc::SIGTERM);
    }

    fn set_ignored(sig: i32) -> libc::c_long {
        let act = KernelSigaction {
            handler: libc::SIG_IGN,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // SAFETY: as in set_default, with SIG_IGN.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &act as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        }
    }

    /// Runs [`reset_for_exec`] in a child process (it changes process-wide
    /// dispositions, which would disturb the other tests) after ignoring
    /// and blocking signals the way an agent thread might, and checks the
    /// child's `/proc/thread-self/status`.
    #[test]
    fn reset_clears_ignored_and_blocked_signals() {
        const CHILD: &str = "CAPSULE_TEST_RESET_SIGNALS_CHILD";
        if std::env::var_os(CHILD).is_some() {
            use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
            // SAFETY: SIG_IGN installs no handler code.
            unsafe {
                signal::signal(Signal::SIGTERM, SigHandler::SigIgn).unwrap();
                signal::signal(Signal::SIGPIPE, SigHandler::SigIgn).unwrap();
            }
            let mut set = SigSet::empty();
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGUSR1);
            signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).unwrap();
            // Signal 32 (glibc's SIGCANCEL) too: glibc's sigaction() refuses it.
            assert_eq!(set_ignored(32), 0);
            let before = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let b = parse_status(&before).unwrap();
            assert_ne!(b.ignored & (1 << 14), 0, "{before}");
            assert_ne!(b.ignored & (1 << 31), 0, "{before}");
            assert_ne!(b.blocked & (1 << 14), 0, "{before}");
            reset_for_exec().unwrap();
            let after = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let a = parse_status(&after).unwrap();
            assert_eq!((a.ignored, a.blocked), (0, 0), "{after}");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "signals::tests::reset_clears_ignored_and_blocked_signals",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("1 passed"), "the child ran the check: {text}");
    }
}
