//! Host-side helpers: timed commands, `ctr` against the bench's containerd,
//! process memory (VmRSS, PSS), machine facts.
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use capsule_tests::{text, Env, NAMESPACE};

/// Runs `cmd` to completion and returns how long it took (spawn to exit,
/// measured by the thread that waits) with its output. Killed, and an
/// error, after `timeout`.
pub fn timed(mut cmd: Command, timeout: Duration) -> Result<(Duration, Output)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = child.wait_with_output();
        let _ = tx.send((t0.elapsed(), r));
    });
    match rx.recv_timeout(timeout) {
        Ok((took, r)) => Ok((took, r?)),
        Err(_) => {
            capsule_tests::sigkill(pid);
            bail!("{cmd:?} did not finish within {timeout:?}")
        }
    }
}

/// [`timed`], failing unless the command succeeded.
pub fn timed_ok(cmd: Command, timeout: Duration) -> Result<Duration> {
    let what = format!("{cmd:?}");
    let (took, out) = timed(cmd, timeout)?;
    if !out.status.success() {
        bail!("{what} failed: {}", text(&out));
    }
    Ok(took)
}

/// `ctr --address <env> --namespace <ns> ARGS`.
pub fn ctr(env: &Env, args: &[&str]) -> Command {
    let mut c = Command::new("ctr");
    c.arg("--address")
        .arg(&env.sock)
        .args(["--namespace", NAMESPACE])
        .args(args);
    c
}

/// `key:  value kB` of a /proc status-like file, in KiB.
fn kib_field(path: &str, key: &str) -> Result<f64> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no {key} in {path}"))
}

/// Resident set size of `pid` in MiB.
pub fn rss_mib(pid: u32) -> Result<f64> {
    Ok(kib_field(&format!("/proc/{pid}/status"), "VmRSS:")? / 1024.0)
}

/// Proportional set size of `pid` in MiB.
pub fn pss_mib(pid: u32) -> Result<f64> {
    Ok(kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:")? / 1024.0)
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": comm may hold spaces and parens.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(pp) = ppid {
                parents.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// The PSS of a process tree by kind of page, in MiB (smaps_rollup's
/// Pss_Anon, Pss_File, Pss_Shmem).
#[derive(Debug, Clone, Copy, Default)]
pub struct PssSplit {
    /// Private anonymous memory (QEMU's heap, TCG's translation cache).
    pub anon: f64,
    /// File pages: the binary and its libraries, shared with every process
    /// that maps them.
    pub file: f64,
    /// Shared memory: a VM's guest RAM (memory-backend-memfd), split among
    /// QEMU and the vhost-user backends that map it.
    pub shmem: f64,
}

/// [`PssSplit`] of `pid` and its descendants.
pub fn pss_split_tree(pid: u32) -> Result<PssSplit> {
    let mut s = PssSplit::default();
    for p in tree(pid) {
        let f = format!("/proc/{p}/smaps_rollup");
        s.anon += kib_field(&f, "Pss_Anon:")? / 1024.0;
        s.file += kib_field(&f, "Pss_File:")? / 1024.0;
        s.shmem += kib_field(&f, "Pss_Shmem:")? / 1024.0;
    }
    Ok(s)
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.lines().next().unwrap_or_default().trim().to_string()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// What the numbers were measured on.
pub fn machine_facts(accel: &str, guest_dir: &Path) -> Vec<(String, String)> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem = kib_field("/proc/meminfo", "MemTotal:")
        .map(|k| format!("{:.1} GiB", k / 1024.0 / 1024.0))
        .unwrap_or_else(|_| "unknown".into());
    let guest_kernel = std::fs::read_to_string(guest_dir.join("kernel-version"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    vec![
        ("date (UTC)".into(), first_line("date", &["-u", "+%F %T"])),
        ("cores".into(), cores),
        ("CPU".into(), cpu),
        ("memory".into(), mem),
        ("host kernel".into(), first_line("uname", &["-r"])),
        ("guest kernel".into(), guest_kernel),
        ("accel".into(), accel.into()),
        (
            "QEMU".into(),
            first_line("qemu-system-x86_64", &["--version"]),
        ),
        (
            "containerd".into(),
            first_line("containerd", &["--version"]),
        ),
        ("runc".into(), first_line("runc", &["--version"])),
        ("load average at start".into(), load_average()),
    ]
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
