//! Process stdio: the host side containerd hands over (fifo paths,
//! `file://` and `binary://` URIs) and the copy loops between it and the
//! guest agent's streams.
//!
//! - stdout/stderr: a task per stream calls the agent's ReadStdout/ReadStderr
//!   (blocking calls, multiplexed on the agent connection) and writes what
//!   comes to the host end until the agent reports end of stream. When the
//!   host reader is gone, output is still drained (and dropped) so the guest
//!   process never blocks on a full pipe.
//! - stdin: the fifo is opened read-write (so it never reports a spurious
//!   EOF before containerd's writer opens it) and copied to WriteStdin until
//!   containerd calls CloseIO; what is still buffered is sent, then
//!   CloseStdin.
//! - `binary://PATH?k=v`: containerd's logging protocol: the binary gets
//!   fd 3 (stdout pipe), fd 4 (stderr pipe), fd 5 (closed when ready), env
//!   CONTAINER_ID and CONTAINER_NAMESPACE, args `k v` from the query.
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// How long a logging binary may take to signal readiness.
const BINARY_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes asked from the agent per read.
const READ_CHUNK: u32 = 64 * 1024;

/// Where one stream goes on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Not attached.
    None,
    /// A fifo (plain path, as containerd passes it).
    Fifo(PathBuf),
    /// `file:///path`: appended to.
    File(PathBuf),
    /// `binary:///path?k=v`: a logging binary.
    Binary { path: PathBuf, args: Vec<String> },
}

/// Parses a stdio URI or fifo path as containerd passes it.
pub fn parse_target(uri: &str) -> Result<Target> {
    if uri.is_empty() {
        return Ok(Target::None);
    }
    let bad = |why: &str| Error::invalid(format!("stdio {uri:?}: {why}"));
    let Some((scheme, rest)) = uri.split_once("://") else {
        let p = PathBuf::from(uri);
        if !p.is_absolute() {
            return Err(bad("a fifo path must be absolute"));
        }
        return Ok(Target::Fifo(p));
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    // `scheme://host/path`: only an empty host (or "localhost") is meaningful.
    let path = match path.find('/') {
        Some(0) => path.to_string(),
        Some(i) if &path[..i] == "localhost" => path[i..].to_string(),
        _ => return Err(bad("expected an absolute path after scheme://")),
    };
    let path = PathBuf::from(percent_decode(&path).map_err(|e| bad(&e))?);
    match scheme {
        "fifo" => Ok(Target::Fifo(path)),
        "file" => {
            if query.is_some() {
                return Err(bad("file:// takes no query"));
            }
            Ok(Target::File(path))
        }
        "binary" => {
            let mut args = Vec::new();
            for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                args.push(percent_decode(&k.replace('+', " ")).map_err(|e| bad(&e))?);
                if !v.is_empty() {
                    args.push(percent_decode(&v.replace('+', " ")).map_err(|e| bad(&e))?);
                }
            }
            Ok(Target::Binary { path, args })
        }
        other => Err(bad(&format!(
            "unsupported scheme {other:?} (expected a fifo path, file:// or binary://)"
        ))),
    }
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 after percent decoding".into())
}

/// The stdio of one process as containerd gave it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioConfig {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioConfig {
    pub fn has_stdin(&self) -> bool {
        !self.stdin.is_empty()
    }
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The guest side of a process's stdio (the agent).
#[async_trait]
pub trait Streams: Send + Sync {
    /// Up to `len` bytes; empty means end of stream.
    async fn read(&self, stream: Stream, len: u32) -> Result<Vec<u8>>;
    async fn write_stdin(&self, data: &[u8]) -> Result<usize>;
    async fn close_stdin(&self) -> Result<()>;
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The opened host ends, before copying starts.
pub struct HostIo {
    stdin: Option<tokio::net::unix::pipe::Receiver>,
    stdout: Option<Writer>,
    stderr: Option<Writer>,
    logger: Option<tokio::process::Child>,
}

impl std::fmt::Debug for HostIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostIo")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("logger", &self.logger.as_ref().and_then(|c| c.id()))
            .finish()
    }
}

/// Identity passed to logging binaries.
#[derive(Debug, Clone)]
pub struct IoContext {
    pub container_id: String,
    pub namespace: String,
}

impl HostIo {
    /// Opens every host end (spawning a logging binary if asked). Nothing
    /// is copied yet; dropping the result closes everything.
    pub async fn open(cfg: &StdioConfig, ctx: &IoContext) -> Result<Self> {
        let out = parse_target(&cfg.stdout)?;
        let err = if cfg.terminal {
            Target::None
        } else {
            parse_target(&cfg.stderr)?
        };
        let stdin = match parse_target(&cfg.stdin)? {
            Target::None => None,
            Target::Fifo(p) => Some(open_stdin_fifo(&p)?),
            other => {
                return Err(Error::invalid(format!(
                    "stdin {other:?}: only a fifo can be stdin"
                )))
            }
        };
        let mut io = HostIo {
            stdin,
            stdout: None,
            stderr: None,
            logger: None,
        };
        if let Target::Binary { path, args } = &out {
            let (child, o, e) = spawn_logger(path, args, ctx).await?;
            io.logger = Some(child);
            io.stdout = Some(Box::new(o));
            // containerd passes the same URI for both streams.
            if err == out {
                io.stderr = Some(Box::new(e));
                return Ok(io);
            }
        } else {
            io.stdout = open_output(&out).await?;
        }
        io.stderr = match &err {
            Target::Binary { .. } if io.logger.is_some() => {
                return Err(Error::invalid(
                    "stdout and stderr name different logging binaries",
                ))
            }
            Target::Binary { path, args } => {
                let (child, _o, e) = spawn_logger(path, args, ctx).await?;
                io.logger = Some(child);
                Some(Box::new(e))
            }
            t => open_output(t).await?,
        };
        Ok(io)
    }
}

fn open_stdin_fifo(p: &Path) -> Result<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(p)
        .map_err(|e| crate::error::io(format!("stdin fifo {}", p.display()), e))
}

async fn open_output(t: &Target) -> Result<Option<Writer>> {
    match t {
        Target::None => Ok(None),
        Target::Fifo(p) => {
            let opts = tokio::net::unix::pipe::OpenOptions::new();
            let sender = match opts.open_sender(p) {
                Ok(s) => s,
                // No reader yet: hold a reader ourselves so the open
                // succeeds; output waits in the pipe for the real reader.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    tokio::net::unix::pipe::OpenOptions::new()
                        .read_write(true)
                        .open_sender(p)
                        .map_err(|e| crate::error::io(format!("output fifo {}", p.display()), e))?
                }
                Err(e) => return Err(crate::error::io(format!("output fifo {}", p.display()), e)),
            };
            Ok(Some(Box::new(sender)))
        }
        Target::File(p) => {
            if let Some(dir) = p.parent() {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|e| crate::error::io(format!("log directory {}", dir.display()), e))?;
            }
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .await
                .map_err(|e| crate::error::io(format!("log file {}", p.display()), e))?;
            Ok(Some(Box::new(f)))
        }
        Target::Binary { .. } => Err(Error::internal("logging binary opened twice")),
    }
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::internal(format!("pipe: {e}")))
}

/// Starts a logging binary; returns it and the write ends of its stdout and
/// stderr pipes, once it reported ready.
async fn spawn_logger(
    path: &Path,
    args: &[String],
    ctx: &IoContext,
) -> Result<(
    tokio::process::Child,
    tokio::net::unix::pipe::Sender,
    tokio::net::unix::pipe::Sender,
)> {
    let what = format!("logging binary {}", path.display());
    let (out_r, out_w) = cloexec_pipe()?;
    let (err_r, err_w) = cloexec_pipe()?;
    let (ready_r, ready_w) = cloexec_pipe()?;
    let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = tokio::process::Command::new(path);
    cmd.args(args)
        .env_clear()
        .env("CONTAINER_ID", &ctx.container_id)
        .env("CONTAINER_NAMESPACE", &ctx.namespace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(false);
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Move the sources above 10 first so dup2 onto 3..5 never
            // clobbers one of them.
            let mut high = [0; 3];
            for (i, fd) in fds.iter().enumerate() {
                let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high[i] = h;
            }
            for (i, h) in high.iter().enumerate() {
                if libc::dup2(*h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| crate::error::io(format!("starting {what}"), e))?;
    drop((out_r, err_r, ready_w));
    let mut ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_r)
        .map_err(|e| crate::error::io(format!("{what}: ready pipe"), e))?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(BINARY_READY_TIMEOUT, ready.read(&mut b)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(crate::error::io(format!("{what}: waiting for ready"), e)),
        Err(_) => {
            return Err(Error::deadline(format!(
                "{what} did not signal readiness within {BINARY_READY_TIMEOUT:?}"
            )))
        }
    }
    let o = tokio::net::unix::pipe::Sender::from_owned_fd(out_w)
        .map_err(|e| crate::error::io(format!("{what}: stdout pipe"), e))?;
    let e = tokio::net::unix::pipe::Sender::from_owned_fd(err_w)
        .map_err(|e| crate::error::io(format!("{what}: stderr pipe"), e))?;
    Ok((child, o, e))
}

/// Copy tasks of one process.
pub struct ProcessIo {
    close_stdin: Mutex<Option<oneshot::Sender<()>>>,
    stdin_task: Mutex<Option<JoinHandle<()>>>,
    outputs: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
    logger: tokio::sync::Mutex<Option<tokio::process::Child>>,
}

impl std::fmt::Debug for ProcessIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessIo").finish_non_exhaustive()
    }
}

impl ProcessIo {
    /// Starts copying between `host` and `streams`.
    pub fn start(host: HostIo, streams: std::sync::Arc<dyn Streams>) -> Self {
        let mut outputs = Vec::new();
        for (stream, w) in [(Stream::Stdout, host.stdout), (Stream::Stderr, host.stderr)] {
            if let Some(w) = w {
                outputs.push(tokio::spawn(copy_out(streams.clone(), stream, w)));
            }
        }
        let (tx, rx) = oneshot::channel();
        let stdin_task = host
            .stdin
            .map(|r| tokio::spawn(copy_in(streams.clone(), r, rx)));
        ProcessIo {
            close_stdin: Mutex::new(stdin_task.as_ref().map(|_| tx)),
            stdin_task: Mutex::new(stdin_task),
            outputs: tokio::sync::Mutex::new(outputs),
            logger: tokio::sync::Mutex::new(host.logger),
        }
    }

    /// containerd's CloseIO: send what is buffered, then close the
    /// process's stdin.
    pub fn close_stdin(&self) {
        if let Some(tx) = self
            .close_stdin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = tx.send(());
        }
    }

    /// Waits until every output stream reached its end, at most `timeout`.
    /// Returns whether they all did.
    pub async fn wait_output(&self, timeout: Duration) -> bool {
        let mut outputs = self.outputs.lock().await;
        let deadline = tokio::time::Instant::now() + timeout;
        for h in outputs.iter_mut() {
            if h.is_finished() {
                continue;
            }
            if tokio::time::timeout_at(deadline, h).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Stops everything: waits briefly for output, closes the host ends and
    /// lets a logging binary finish.
    pub async fn shutdown(&self, grace: Duration) {
        if !self.wait_output(grace).await {
            tracing::warn!("process output did not end in time; closing it");
        }
        for h in self.outputs.lock().await.drain(..) {
            h.abort();
        }
        if let Some(h) = self
            .stdin_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            h.abort();
        }
        if let Some(mut child) = self.logger.lock().await.take() {
            // Its pipes closed with the copy tasks: it sees EOF and exits.
            match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(
                        "logging binary did not exit after its pipes closed; killing it"
                    );
                    let _ = child.kill().await;
                }
            }
        }
    }
}

async fn copy_out(streams: std::sync::Arc<dyn Streams>, stream: Stream, mut w: Writer) {
    let mut host_ok = true;
    loop {
        let data = match streams.read(stream, READ_CHUNK).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(?stream, error = %e, "output stream ended with an error");
                break;
            }
        };
        if data.is_empty() {
            break;
        }
        if host_ok {
            if let Err(e) = w.write_all(&data).await {
                // The reader went away: keep draining the guest side.
                tracing::debug!(?stream, error = %e, "host end of the output closed");
                host_ok = false;
            }
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

async fn copy_in(
    streams: std::sync::Arc<dyn Streams>,
    mut r: tokio::net::unix::pipe::Receiver,
    mut close: oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            res = r.read(&mut buf) => match res {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = write_all(&*streams, &buf[..n]).await {
                        tracing::debug!(error = %e, "stdin copy stopped");
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "stdin fifo read failed");
                    break;
                }
            },
            _ = &mut close => {
                // Send what containerd wrote before closing.
                loop {
                    match r.try_read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if write_all(&*streams, &buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => break,
                    }
                }
                break;
            }
        }
    }
    if let Err(e) = streams.close_stdin().await {
        tracing::debug!(error = %e, "closing the process's stdin failed");
    }
}

async fn write_all(streams: &dyn Streams, mut data: &[u8]) -> Result<()> {
    while !data.is_empty() {
        let n = streams.write_stdin(data).await?;
        if n == 0 {
            return Err(Error::internal("the agent accepted no stdin bytes"));
        }
        data = &data[n.min(data.len())..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Arc;

    #[test]
    fn parses_stdio_uris() {
        assert_eq!(parse_target("").unwrap(), Target::None);
        assert_eq!(
            parse_target("/run/x/stdout").unwrap(),
            Target::Fifo("/run/x/stdout".into())
        );
        assert_eq!(
            parse_target("fifo:///run/x/o").unwrap(),
            Target::Fifo("/run/x/o".into())
        );
        assert_eq!(
            parse_target("file:///var/log/c%201.log").unwrap(),
            Target::File("/var/log/c 1.log".into())
        );
        assert_eq!(
            parse_target("binary:///usr/bin/logger?id=abc&flag&x=a%2Fb").unwrap(),
            Target::Binary {
                path: "/usr/bin/logger".into(),
                args: vec![
                    "id".into(),
                    "abc".into(),
                    "flag".into(),
                    "x".into(),
                    "a/b".into()
                ]
            }
        );
        for bad in [
            "relative/path",
            "http://x/y",
            "file://host/x",
            "file:///x?y=1",
            "binary://",
            "file:///bad%zz",
        ] {
            let e = parse_target(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }

    /// Guest streams: scripted output, recorded stdin.
    #[derive(Default)]
    struct Script {
        out: Mutex<VecDeque<Vec<u8>>>,
        stdin: Mutex<Vec<u8>>,
        closed: Mutex<bool>,
    }

    #[async_trait]
    impl Streams for Script {
        async fn read(&self, stream: Stream, _len: u32) -> Result<Vec<u8>> {
            if stream == Stream::Stderr {
                return Ok(vec![]);
            }
            Ok(self.out.lock().unwrap().pop_front().unwrap_or_default())
        }
        async fn write_stdin(&self, data: &[u8]) -> Result<usize> {
            // Accept at most 3 bytes per call: exercises partial writes.
            let n = data.len().min(3);
            self.stdin.lock().unwrap().extend_from_slice(&data[..n]);
            Ok(n)
        }
        async fn close_stdin(&self) -> Result<()> {
            *self.closed.lock().unwrap() = true;
            Ok(())
        }
    }

    #[tokio::test]
    async fn fifo_copy_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |n: &str| {
            let p = dir.path().join(n);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            p
        };
        let (i, o) = (mk("in"), mk("out"));
        // containerd's side: reader of stdout open before the shim opens it.
        let mut reader = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&o)
            .unwrap();
        let cfg = StdioConfig {
            stdin: i.display().to_string(),
            stdout: o.display().to_string(),
            stderr: String::new(),
            terminal: false,
        };
        let ctx = IoContext {
            container_id: "c".into(),
            namespace: "ns".into(),
        };
        let host = HostIo::open(&cfg, &ctx).await.unwrap();
        let script = Arc::new(Script::default());
        script
            .out
            .lock()
            .unwrap()
            .extend([b"hello ".to_vec(), b"world\n".to_vec()]);
        let pio = ProcessIo::start(host, script.clone());
        let mut writer = tokio::net::unix::pipe::OpenOptions::new()
            .open_sender(&i)
            .unwrap();
        writer.write_all(b"typed input").await.unwrap();
        drop(writer);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world\n");
        assert!(pio.wait_output(Duration::from_secs(5)).await);
        pio.close_stdin();
        for _ in 0..100 {
            if *script.closed.lock().unwrap() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(*script.closed.lock().unwrap());
        assert_eq!(&*script.stdin.lock().unwrap(), b"typed input");
        pio.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn file_and_binary_targets() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sub/out.log");
        let cfg = StdioConfig {
            stdout: format!("file://{}", log.display()),
            stderr: format!("file://{}", log.display()),
            ..Default::default()
        };
        let ctx = IoContext {
            container_id: "c9".into(),
            namespace: "ns9".into(),
        };
        let host = HostIo::open(&cfg, &ctx).await.unwrap();
        let script = Arc::new(Script::default());
        script
            .out
            .lock()
            .unwrap()
            .push_back(b"to the file\n".to_vec());
        let pio = ProcessIo::start(host, script);
        assert!(pio.wait_output(Duration::from_secs(5)).await);
        pio.shutdown(Duration::from_secs(1)).await;
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "to the file\n");

        // A logging binary: a shell script that copies fd 3 to a file and
        // records its environment and arguments.
        let bin = dir.path().join("logger.sh");
        let out = dir.path().join("binary.out");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\necho \"$CONTAINER_ID $CONTAINER_NAMESPACE $*\" > {o}.env\nexec 5>&-\ncat <&3 > {o}\n",
                o = out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let uri = format!("binary://{}?tag=x", bin.display());
        let cfg = StdioConfig {
            stdout: uri.clone(),
            stderr: uri,
            ..Default::default()
        };
        let host = HostIo::open(&cfg, &ctx).await.unwrap();
        let script = Arc::new(Script::default());
        script
            .out
            .lock()
            .unwrap()
            .push_back(b"via binary\n".to_vec());
        let pio = ProcessIo::start(host, script);
        pio.shutdown(Duration::from_secs(5)).await;
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "via binary\n");
        assert_eq!(
            std::fs::read_to_string(format!("{}.env", out.display())).unwrap(),
            "c9 ns9 tag x\n"
        );
    }
}
