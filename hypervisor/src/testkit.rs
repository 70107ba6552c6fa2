//! Helpers for tests that run real QEMU (feature `testkit`; enabled as a
//! dev-dependency feature by this crate and by the agent's tests).
//!
//! Host resources a test needs, each released on drop: [`LoopDev`] (a loop
//! device over a file), [`Daemon`] (a background process such as
//! qemu-storage-daemon or virtiofsd, killed and reaped), and the checks that
//! fail a test with what to install when a tool is missing
//! ([`require_binary`], [`require_root`]), and [`GuestShell`], the command
//! channel of the test guest (`initramfs-test.img`). Nothing here is used by
//! the runtime itself.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Finds a host binary in `PATH` or `~/.cargo/bin`; panics with `install`
/// (what to do) when it is missing.
pub fn require_binary(name: &str, install: &str) -> PathBuf {
    find_binary(name)
        .unwrap_or_else(|| panic!("{name} not found in PATH or ~/.cargo/bin: {install}"))
}

/// [`require_binary`] without the panic.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.push("/usr/libexec".into());
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// `qemu-system-x86_64`, or a panic saying how to install it.
pub fn require_qemu() -> PathBuf {
    require_binary(
        "qemu-system-x86_64",
        "install it with `apt-get install qemu-system-x86` (or scripts/install-deps.sh)",
    )
}

/// `qemu-storage-daemon`, or a panic saying how to install it.
pub fn require_storage_daemon() -> PathBuf {
    require_binary(
        "qemu-storage-daemon",
        "install it with `apt-get install qemu-system-common` (or scripts/install-deps.sh)",
    )
}

/// `virtiofsd` (`~/.cargo/bin`, `/usr/libexec`, `PATH`), or a panic saying
/// how to install it.
pub fn require_virtiofsd() -> PathBuf {
    require_binary(
        "virtiofsd",
        "install it with `cargo install virtiofsd` (or scripts/install-deps.sh)",
    )
}

/// Panics unless running as root: `what` says what needs it.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{what} needs root (euid is {euid}): run the tests as root (e.g. `sudo -E cargo test`)"
    );
}

/// A byte pattern recognisable in the guest and on the host.
pub fn pattern(tag: &str, len: usize) -> Vec<u8> {
    tag.as_bytes().iter().copied().cycle().take(len).collect()
}

/// A loop device over a file; detached on drop (lazily by the kernel when
/// QEMU still holds it open).
#[derive(Debug)]
pub struct LoopDev {
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// The backing file.
    pub file: PathBuf,
}

impl LoopDev {
    /// Creates `dir/name` (`size` bytes of zeros) and attaches it.
    pub fn new(dir: &Path, name: &str, size: u64) -> Result<Self> {
        let file = dir.join(name);
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("creating {}", file.display()))?;
        Self::attach(&file)
    }

    /// Attaches an existing file (`losetup --find --show`).
    pub fn attach(file: &Path) -> Result<Self> {
        let losetup = require_binary("losetup", "install util-linux");
        let out = Command::new(losetup)
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .context("running losetup")?;
        if !out.status.success() {
            bail!(
                "losetup --find --show {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let device = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        Ok(Self {
            device,
            file: file.to_path_buf(),
        })
    }

    /// The loop device's `major:minor`.
    pub fn numbers(&self) -> Result<(u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&self.device)
            .with_context(|| format!("stat {}", self.device.display()))?
            .rdev();
        Ok((libc::major(rdev), libc::minor(rdev)))
    }

    /// True while some loop device is still backed by this file.
    pub fn is_attached(file: &Path) -> bool {
        let Ok(out) = Command::new("losetup").arg("-j").arg(file).output() else {
            return false;
        };
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.device)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A background process (a vhost-user backend) killed and reaped on drop.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` with stdout and stderr to `log`.
    pub fn spawn(cmd: &mut Command, name: &str, log: &Path) -> Result<Self> {
        let f =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            child,
            name: name.into(),
            log: log.to_path_buf(),
        })
    }

    /// Waits until `path` exists (the daemon's socket), or the daemon dies.
    pub fn wait_for(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}): {}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not create {} within {timeout:?}: {}",
                    self.name,
                    path.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills and reaps the process now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// qemu-storage-daemon exporting the raw file `image` as a vhost-user-blk
    /// backend on the unix socket `socket`; waits for the socket.
    pub fn vhost_user_blk(image: &Path, socket: &Path, log: &Path) -> Result<Self> {
        let qsd = require_storage_daemon();
        let mut d = Self::spawn(
            Command::new(qsd)
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f1,filename={}",
                    image.display()
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e1,node-name=f1,addr.type=unix,addr.path={},writable=on",
                    socket.display()
                )),
            "qemu-storage-daemon",
            log,
        )?;
        d.wait_for(socket, Duration::from_secs(10))?;
        Ok(d)
    }

    /// virtiofsd sharing `shared` on the unix socket `socket` (no sandbox,
    /// no cache: what the tests need); waits for the socket.
    pub fn virtiofsd(shared: &Path, socket: &Path, log: &Path) -> Result<Self> {
        let bin = require_virtiofsd();
        let mut d = Self::spawn(
            Command::new(bin)
                .arg(format!("--socket-path={}", socket.display()))
                .arg(format!("--shared-dir={}", shared.display()))
                .args(["--sandbox=none", "--cache=never"]),
            "virtiofsd",
            log,
        )?;
        d.wait_for(socket, Duration::from_secs(10))?;
        Ok(d)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The smallest QMP client that does the job: no ids, no timeouts, no
/// event routing. Benchmarks measure capsule's QMP path against it.
pub struct BareQmp {
    r: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl BareQmp {
    pub async fn connect(path: &Path) -> Result<Self> {
        use serde_json::json;
        let (r, w) = tokio::net::UnixStream::connect(path).await?.into_split();
        let mut b = Self {
            r: tokio::io::BufReader::new(r),
            w,
        };
        b.line().await?; // greeting
        b.cmd("qmp_capabilities", json!({})).await?;
        Ok(b)
    }
    pub async fn line(&mut self) -> Result<serde_json::Value> {
        use tokio::io::AsyncBufReadExt;
        let mut s = String::new();
        if self.r.read_line(&mut s).await? == 0 {
            bail!("QMP closed");
        }
        Ok(serde_json::from_str(&s)?)
    }
    pub async fn cmd(
        &mut self,
        execute: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value> {
        use tokio::io::AsyncWriteExt;
        let msg = serde_json::json!({ "execute": execute, "arguments": arguments });
        self.w.write_all(format!("{msg}\n").as_bytes()).await?;
        loop {
            let v = self.line().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("{execute}: {e}");
            }
        }
    }
    pub async fn wait_deleted(&mut self, id: &str) -> Result<()> {
        loop {
            let v = self.line().await?;
            if v["event"] == "DEVICE_DELETED" && v["data"]["device"] == id {
                return Ok(());
            }
        }
    }
}

/// The guest's command shell over the virtio-serial port.
pub struct GuestShell {
    stream: UnixStream,
    buf: Vec<u8>,
    seq: u64,
}

impl GuestShell {
    pub async fn connect(path: &Path) -> Result<Self> {
        let mut stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("connecting to the agent channel {}", path.display()))?;
        // A lone newline ends any partial line an earlier client left.
        stream.write_all(b"\n").await?;
        let mut s = Self {
            stream,
            buf: Vec::new(),
            seq: 0,
        };
        // The guest restarts its shell every 0.2 s while nobody is connected.
        s.run_ok("true", Duration::from_secs(20)).await?;
        Ok(s)
    }

    /// Runs `cmd`; returns (exit status, output).
    pub async fn run(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String)> {
        let tag = self.start(cmd).await?;
        self.finish(&tag, cmd, timeout).await
    }

    /// Sends `cmd` without waiting; returns the tag for [`finish`](Self::finish).
    pub async fn start(&mut self, cmd: &str) -> Result<String> {
        self.seq += 1;
        let tag = format!("{}_{}", std::process::id(), self.seq);
        let line = format!("echo __BEGIN_{tag}__; {cmd}\necho __END_{tag}__ $?\n");
        self.stream.write_all(line.as_bytes()).await?;
        Ok(tag)
    }

    /// Waits for the command started as `tag`.
    pub async fn finish(
        &mut self,
        tag: &str,
        cmd: &str,
        timeout: Duration,
    ) -> Result<(i32, String)> {
        let begin = format!("__BEGIN_{tag}__\n");
        let end = format!("__END_{tag}__ ");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            if let Some(b) = text.find(&begin) {
                let body_start = b + begin.len();
                if let Some(e) = text[body_start..].find(&end) {
                    let after = &text[body_start + e + end.len()..];
                    if let Some(nl) = after.find('\n') {
                        let status: i32 = after[..nl].trim().parse().context("bad exit status")?;
                        let body = text[body_start..body_start + e].to_owned();
                        let consumed = body_start + e + end.len() + nl + 1;
                        self.buf = text.as_bytes()[consumed..].to_vec();
                        return Ok((status, body));
                    }
                }
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| {
                    anyhow!("guest command {cmd:?} did not finish within {timeout:?}")
                })??;
            if n == 0 {
                bail!("agent channel closed while running {cmd:?}");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Runs `cmd`, requiring exit status 0; returns its output.
    pub async fn run_ok(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        let (status, out) = self.run(cmd, timeout).await?;
        if status != 0 {
            bail!("guest command {cmd:?} exited {status}: {out}");
        }
        Ok(out)
    }
}
