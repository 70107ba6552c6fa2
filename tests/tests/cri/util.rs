//! Helpers shared by the cases.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use capsule_tests::cri::client::CallError;
use capsule_tests::cri::proto::v1::{ContainerConfig, PodSandboxConfig};
use capsule_tests::cri::stream;
use capsule_tests::cri::suite::Ctx;

/// The container's CRI log file.
pub fn log_path(p: &PodSandboxConfig, c: &ContainerConfig) -> PathBuf {
    Path::new(&p.log_directory).join(&c.log_path)
}

/// Waits until the file at `path` contains `needle`; its content.
pub fn wait_file_contains(path: &Path, needle: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if s.contains(needle) {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            bail!(
                "{} does not contain {needle:?} after {timeout:?}; it has {s:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the container's log contains `needle`.
pub fn wait_log(p: &PodSandboxConfig, c: &ContainerConfig, needle: &str) -> Result<String> {
    wait_file_contains(&log_path(p, c), needle, Duration::from_secs(60))
}

/// The value of `key` (e.g. "CapEff") in /proc/1/status of the container.
pub fn proc1_status(ctx: &Ctx, id: &str, key: &str) -> Result<String> {
    let out = ctx.sh_ok(id, "cat /proc/1/status")?;
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {key} in /proc/1/status: {out:?}"))
}

/// An HTTP/1.0 GET of `/` from inside the node's network namespace.
pub fn http_get_from_node(ctx: &Ctx, addr: &str) -> Result<String> {
    let mut s = stream::connect_in_netns(&ctx.node.netns.path, addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .with_context(|| format!("reading the answer of {addr}"))?;
    Ok(out)
}

/// Asserts a call was refused within `within`, its message containing
/// `reason`; notes the message for the report.
pub fn expect_refusal<T: std::fmt::Debug>(
    ctx: &mut Ctx,
    r: std::result::Result<T, CallError>,
    within: Duration,
    reason: &str,
) -> Result<()> {
    let e = match r {
        Ok(v) => bail!("capsule accepted what it must refuse (got {v:?})"),
        Err(e) => e,
    };
    ensure!(
        e.elapsed <= within,
        "refused, but only after {:.1} s (limit {within:?}): {e}",
        e.elapsed.as_secs_f64()
    );
    ensure!(
        e.message.contains(reason),
        "refused without naming the reason ({reason:?}): {e}"
    );
    ctx.note(format!(
        "refused in {:.1} s: {}",
        e.elapsed.as_secs_f64(),
        e.message
    ));
    Ok(())
}

/// Runs `cmd` on the host; fails with its output.
pub fn host(cmd: &str) -> Result<String> {
    let o = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .with_context(|| format!("running `{cmd}`"))?;
    ensure!(
        o.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A capability bit mask as /proc/PID/status prints it.
pub fn cap_mask(bits: &[u32]) -> String {
    format!("{:016x}", bits.iter().fold(0u64, |m, b| m | (1u64 << b)))
}

/// containerd's default capabilities of an unprivileged container.
pub const DEFAULT_CAPS: &[u32] = &[
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    13, // NET_RAW
    18, // SYS_CHROOT
    27, // MKNOD
    29, // AUDIT_WRITE
    31, // SETFCAP
];
