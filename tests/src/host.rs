//! Host-side helpers: commands with deadlines, polling, our children and
//! other processes, mounts, device nodes, containerd's shim sockets and one
//! ttrpc call to a shim.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// SIGTERM to our child `c`, SIGKILL after `grace`; reaped either way.
pub fn stop_child(c: &mut std::process::Child, grace: Duration) {
    // SAFETY: plain kill(2) of our own child.
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// The ids of the sandboxes with a state directory under capsule's
/// `state_dir`, sorted.
pub fn sandbox_ids(state_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state_dir.join("sandboxes"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// With `CAPSULE_E2E_LOGS=DIR`, keeps the containerd log (the shims log
/// into it) of the private daemon in `dir` as `DIR/<dir's name>.log`.
pub fn keep_containerd_log(dir: &Path) {
    let Some(keep) = std::env::var_os("CAPSULE_E2E_LOGS") else {
        return;
    };
    let keep = PathBuf::from(keep);
    let _ = std::fs::create_dir_all(&keep);
    let name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let _ = std::fs::copy(
        dir.join("containerd.log"),
        keep.join(name).with_extension("log"),
    );
}

/// Runs `cmd` with a deadline; kills it when the deadline passes.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let mut so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut se = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    })
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `f` until it returns `Some`, at most `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (pid, argv) of every process.
pub fn processes() -> Vec<(u32, Vec<String>)> {
    let mut v = Vec::new();
    let Ok(d) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in d.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.is_empty() {
            v.push((pid, args));
        }
    }
    v
}

/// Sockets in containerd's shim socket directory nobody listens on.
pub fn dead_shim_sockets() -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(d) = std::fs::read_dir("/run/containerd/s") else {
        return Vec::new();
    };
    d.flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()))
        .filter(|p| {
            matches!(std::os::unix::net::UnixStream::connect(p),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
        .collect()
}

/// Mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let points = capsule_shim::mount::parse_mountinfo(&info);
    capsule_shim::mount::mounts_under(&points, dir)
}

/// A device node (`kind` S_IFBLK or S_IFCHR), mode 0600.
pub fn mknod(path: &Path, kind: nix::sys::stat::SFlag, major: u64, minor: u64) -> Result<()> {
    nix::sys::stat::mknod(
        path,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(major, minor),
    )
    .with_context(|| format!("mknod {}", path.display()))
}

/// A block device node, mode 0600.
pub fn mknod_block(path: &Path, major: u64, minor: u64) -> Result<()> {
    mknod(path, nix::sys::stat::SFlag::S_IFBLK, major, minor)
}

/// Sends SIGKILL to `pid`.
pub fn sigkill(pid: u32) {
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// One ttrpc call to a shim socket, without an async runtime (tests).
/// Returns the response payload, or the status code and message.
pub fn shim_call(
    address: &str,
    service: &str,
    method: &str,
    payload: Vec<u8>,
) -> Result<std::result::Result<Vec<u8>, (i32, String)>> {
    use capsule_shim::protos::protobuf::Message;
    use capsule_shim::protos::ttrpc;
    use std::io::Write;
    let path = address.strip_prefix("unix://").unwrap_or(address);
    let mut sock = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("connecting to {path}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut r = ttrpc::Request::new();
    r.service = service.into();
    r.method = method.into();
    r.payload = payload;
    let body = r.write_to_bytes()?;
    let mut frame = Vec::new();
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&1u32.to_be_bytes());
    frame.extend_from_slice(&[1, 0]);
    frame.extend_from_slice(&body);
    sock.write_all(&frame)?;
    let mut header = [0u8; 10];
    sock.read_exact(&mut header)?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body)?;
    let resp = ttrpc::Response::parse_from_bytes(&body)?;
    let code = resp.status.code.value();
    if code != 0 {
        return Ok(Err((code, resp.status.message.clone())));
    }
    Ok(Ok(resp.payload))
}
