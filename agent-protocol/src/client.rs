//! Host side of the agent connection: ttrpc over QEMU's virtio-serial chardev.
//!
//! QEMU exposes the guest port `agent.channel.0` as a unix socket
//! (`-chardev socket,id=agent0,path=SOCK,server=on,wait=off`). [`AgentConn`]
//! connects to it, runs the session handshake below, and hands the stream to
//! a ttrpc [`Client`](ttrpc::r#async::Client).
//!
//! **One client at a time.** The serial port is a single byte stream: QEMU's
//! socket chardev serves one connection, and a second client is not serviced
//! until the first disconnects (its handshake times out). Use one `AgentConn`
//! per sandbox and clone [`AgentConn::client`] if several tasks need it.
//!
//! # Session handshake and escaping
//!
//! The port outlives every host client, so bytes of a dead client can still be
//! in flight both ways: a half-sent request towards the guest, and a response
//! the guest was blocked writing while nobody was connected (QEMU delivers it
//! to the *next* client). The guest does not even always see a disconnect
//! (close + connect in quick succession reach its driver together). So:
//!
//! ```text
//! host  -> guest: HELLO_MAGIC ++ nonce      (16 + 16 bytes; re-sent every second until answered)
//! guest -> host : READY_MAGIC ++ nonce
//! host  -> guest: the ttrpc stream, escaped: 0xff is sent as ff 00
//! guest -> host : the ttrpc stream, as is
//! ```
//!
//! The nonce is 16 lowercase hex digits, fresh per connection. Since the host
//! stream is escaped, `ff 01` (the start of HELLO_MAGIC) can only be a HELLO:
//! the agent finds it anywhere, even inside a frame a dead client left half
//! sent, and starts a new ttrpc connection there. The host drops everything
//! before *its* READY (stale frames of an earlier session). The guest answers
//! only once its agent has opened the port, so a completed handshake also
//! means "agent is up".
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::agent::*;
use crate::agent_ttrpc::AgentClient;

/// Sent by the host at the start of each connection, followed by the nonce.
/// Starts with `ESCAPE, 0x01`, which escaped data never contains.
pub const HELLO_MAGIC: [u8; 16] = *b"\xff\x01CAPSULE-HELLO\n";
/// Sent by the agent in answer, followed by the same nonce.
pub const READY_MAGIC: [u8; 16] = *b"\xff\x02CAPSULE-READY\n";
/// The escape byte of the host -> guest stream...
pub const ESCAPE: u8 = 0xff;
/// ...and what follows it for a literal 0xff.
pub const ESCAPED_ESCAPE: u8 = 0x00;

/// Appends `data` escaped for the host -> guest direction.
pub fn escape_into(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len() + data.len() / 64);
    for chunk in data.split_inclusive(|&b| b == ESCAPE) {
        out.extend_from_slice(chunk);
        if chunk.last() == Some(&ESCAPE) {
            out.push(ESCAPED_ESCAPE);
        }
    }
}
/// Length of the nonce: lowercase hex digits.
pub const NONCE_LEN: usize = 16;

/// How often an unanswered HELLO is sent again (the guest may not have opened
/// the port yet; QEMU may drop what arrives before that).
const HELLO_RESEND: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to agent socket {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("agent handshake on {}: {reason}", path.display())]
    Handshake { path: PathBuf, reason: String },
    #[error("agent call {method} timed out after {after:?}")]
    Timeout {
        method: &'static str,
        after: Duration,
    },
    #[error("agent call {method} failed ({code:?}): {message}")]
    Status {
        method: &'static str,
        code: ttrpc::Code,
        message: String,
    },
    #[error("agent call {method}: connection error: {source}")]
    Transport {
        method: &'static str,
        source: ttrpc::Error,
    },
    #[error("agent on {} not ready after {after:?}: {last}", path.display())]
    NotReady {
        path: PathBuf,
        after: Duration,
        last: String,
    },
}

impl ClientError {
    /// The ttrpc status code when the agent answered with an error.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            Self::Status { code, .. } => Some(*code),
            Self::Timeout { .. } => Some(ttrpc::Code::DEADLINE_EXCEEDED),
            _ => None,
        }
    }

    /// True when the connection is gone and [`AgentConn::reconnect`] may help.
    pub fn is_disconnected(&self) -> bool {
        matches!(
            self,
            Self::Transport { .. } | Self::Connect { .. } | Self::Handshake { .. }
        )
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Timeouts of an [`AgentConn`].
#[derive(Debug, Clone, Copy)]
pub struct ConnOptions {
    /// Connecting to the socket plus the handshake.
    pub connect_timeout: Duration,
    /// Default per-call timeout (calls that wait for a process use none).
    pub call_timeout: Duration,
}

impl Default for ConnOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(60),
        }
    }
}

/// A ttrpc connection to one sandbox's agent over its serial socket.
pub struct AgentConn {
    path: PathBuf,
    opts: ConnOptions,
    client: AgentClient,
}

impl AgentConn {
    /// Connects (retrying while the socket does not exist or refuses, e.g.
    /// QEMU still starting) and runs the handshake, within `connect_timeout`.
    pub async fn connect(path: impl AsRef<Path>, opts: ConnOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let client = open(&path, opts.connect_timeout).await?;
        Ok(Self { path, opts, client })
    }

    /// Connects and retries Health until the agent serves, for up to
    /// `timeout` (the guest opens its port some seconds after boot).
    pub async fn wait_ready(
        path: impl AsRef<Path>,
        opts: ConnOptions,
        timeout: Duration,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::NotReady {
                    path,
                    after: timeout,
                    last,
                });
            }
            match open(&path, left).await {
                Ok(client) => {
                    let conn = Self {
                        path: path.clone(),
                        opts,
                        client,
                    };
                    match conn
                        .call(
                            "Health",
                            Some(left.min(opts.call_timeout)),
                            |c, ctx| async move { c.health(ctx, &HealthRequest::new()).await },
                        )
                        .await
                    {
                        Ok(r) if r.serving => return Ok(conn),
                        Ok(_) => last = "agent answered Health with serving=false".into(),
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(
                Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
        }
    }

    /// Drops the current connection and opens a new one (after a shim
    /// restart, or when a call returned [`ClientError::is_disconnected`]).
    pub async fn reconnect(&mut self) -> Result<()> {
        // Replace the client first so the old socket closes before QEMU is
        // asked to accept the new one.
        let fresh =
            open_after_drop(&self.path, self.opts.connect_timeout, &mut self.client).await?;
        self.client = fresh;
        Ok(())
    }

    /// The generated client, for calls with custom contexts.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn options(&self) -> ConnOptions {
        self.opts
    }

    /// Runs one call with a timeout applied twice: as the ttrpc context
    /// deadline (the agent sees it) and as a local `tokio::time::timeout`
    /// (covers a dead transport). `None` means no timeout (waits).
    pub async fn call<T, F, Fut>(
        &self,
        method: &'static str,
        timeout: Option<Duration>,
        f: F,
    ) -> Result<T>
    where
        F: FnOnce(AgentClient, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        let ctx = match timeout {
            Some(t) => ttrpc::context::with_duration(t),
            None => ttrpc::context::Context::default(),
        };
        let fut = f(self.client.clone(), ctx);
        let res = match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => return Err(ClientError::Timeout { method, after: t }),
            },
            None => fut.await,
        };
        res.map_err(|e| map_err(method, timeout, e))
    }
}

fn map_err(method: &'static str, timeout: Option<Duration>, e: ttrpc::Error) -> ClientError {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let code = s.code();
            if code == ttrpc::Code::DEADLINE_EXCEEDED
                && timeout.is_some()
                && s.message().contains("deadline")
            {
                // The client-side deadline of the ttrpc context.
                return ClientError::Timeout {
                    method,
                    after: timeout.unwrap_or_default(),
                };
            }
            ClientError::Status {
                method,
                code,
                message: s.message().to_string(),
            }
        }
        ttrpc::Error::Others(m) if m.contains("deadline") => ClientError::Timeout {
            method,
            after: timeout.unwrap_or_default(),
        },
        other => ClientError::Transport {
            method,
            source: other,
        },
    }
}

macro_rules! rpcs {
    ($($(#[$doc:meta])* $name:ident($req:ty) -> $resp:ty, $method:literal, $timeout:ident;)*) => {
        impl AgentConn {
            $(
                $(#[$doc])*
                pub async fn $name(&self, req: &$req) -> Result<$resp> {
                    let t = rpcs!(@timeout self, $timeout);
                    self.call($method, t, |c, ctx| async move { c.$name(ctx, req).await }).await
                }
            )*
        }
    };
    (@timeout $s:ident, default) => { Some($s.opts.call_timeout) };
    (@timeout $s:ident, none) => { None };
}

rpcs! {
    health(HealthRequest) -> HealthResponse, "Health", default;
    guest_details(GuestDetailsRequest) -> GuestDetailsResponse, "GuestDetails", default;
    create_sandbox(CreateSandboxRequest) -> CreateSandboxResponse, "CreateSandbox", default;
    destroy_sandbox(DestroySandboxRequest) -> Empty, "DestroySandbox", default;
    create_container(CreateContainerRequest) -> Empty, "CreateContainer", default;
    start_container(ContainerRequest) -> StartContainerResponse, "StartContainer", default;
    remove_container(RemoveContainerRequest) -> Empty, "RemoveContainer", default;
    pause_container(ContainerRequest) -> Empty, "PauseContainer", default;
    resume_container(ContainerRequest) -> Empty, "ResumeContainer", default;
    update_container(UpdateContainerRequest) -> Empty, "UpdateContainer", default;
    stats_container(ContainerRequest) -> StatsContainerResponse, "StatsContainer", default;
    list_processes(ContainerRequest) -> ListProcessesResponse, "ListProcesses", default;
    exec_process(ExecProcessRequest) -> ExecProcessResponse, "ExecProcess", default;
    signal_process(SignalProcessRequest) -> Empty, "SignalProcess", default;
    /// Waits until the process exits: no timeout.
    wait_process(ProcessRequest) -> WaitProcessResponse, "WaitProcess", none;
    write_stdin(WriteStreamRequest) -> WriteStreamResponse, "WriteStdin", default;
    /// Blocks until output or end of stream (empty data): no timeout.
    read_stdout(ReadStreamRequest) -> ReadStreamResponse, "ReadStdout", none;
    /// Blocks until output or end of stream (empty data): no timeout.
    read_stderr(ReadStreamRequest) -> ReadStreamResponse, "ReadStderr", none;
    close_stdin(ProcessRequest) -> Empty, "CloseStdin", default;
    tty_win_resize(TtyWinResizeRequest) -> Empty, "TtyWinResize", default;
    add_device(AddDeviceRequest) -> AddDeviceResponse, "AddDevice", default;
    remove_device(RemoveDeviceRequest) -> Empty, "RemoveDevice", default;
    /// Waits up to the request's `timeout_ms` for the interfaces: the
    /// connection's call timeout must be longer.
    setup_network(SetupNetworkRequest) -> Empty, "SetupNetwork", default;
    /// The next OOM kill after `req.after` (the `seq` of the last event
    /// handled, 0 at first). Waits until there is one: no timeout.
    /// Cancellation-safe: the agent consumes nothing when it answers, so
    /// dropping this future (or losing the connection) loses no event;
    /// call again with the same `after`. Loop:
    /// `after = conn.get_oom_event(&req(after)).await?.seq` and publish
    /// TaskOOM for each `container_id`.
    get_oom_event(GetOOMEventRequest) -> OOMEvent, "GetOOMEvent", none;
}

async fn open_after_drop(
    path: &Path,
    timeout: Duration,
    old: &mut AgentClient,
) -> Result<AgentClient> {
    // A placeholder client over a closed in-memory pipe takes the old one's
    // place, so the old connection's last handle is dropped right here.
    let (a, _b) = tokio::io::duplex(1);
    let placeholder = AgentClient::new(ttrpc::r#async::Client::new(
        ttrpc::r#async::transport::Socket::new(a),
    ));
    drop(std::mem::replace(old, placeholder));
    open(path, timeout).await
}

/// Connects, handshakes and starts a ttrpc client, all within `timeout`.
async fn open(path: &Path, timeout: Duration) -> Result<AgentClient> {
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match UnixStream::connect(path).await {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() + Duration::from_millis(50) < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(ClientError::Connect {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        }
    };
    let nonce = new_nonce();
    let leftover = handshake(&mut stream, &nonce, deadline)
        .await
        .map_err(|reason| ClientError::Handshake {
            path: path.to_path_buf(),
            reason,
        })?;
    let socket = ttrpc::r#async::transport::Socket::new(Prefixed::new(leftover, stream));
    Ok(AgentClient::new(ttrpc::r#async::Client::new(socket)))
}

/// Sends HELLO (again every second) and reads until READY with our nonce.
/// Returns the bytes that followed READY (normally none).
async fn handshake(
    stream: &mut UnixStream,
    nonce: &[u8; NONCE_LEN],
    deadline: Instant,
) -> Result<Vec<u8>, String> {
    let mut hello = HELLO_MAGIC.to_vec();
    hello.extend_from_slice(nonce);
    let mut want = READY_MAGIC.to_vec();
    want.extend_from_slice(nonce);
    let mut seen: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut dropped = 0usize;
    loop {
        stream
            .write_all(&hello)
            .await
            .map_err(|e| format!("sending HELLO: {e}"))?;
        let resend = (Instant::now() + HELLO_RESEND).min(deadline);
        loop {
            let n = match tokio::time::timeout_at(resend, stream.read(&mut buf)).await {
                Err(_) if Instant::now() >= deadline => {
                    return Err(format!(
                    "no READY from the agent before the deadline ({dropped} stale bytes dropped); \
                         is the guest up, and is no other client connected?"
                ))
                }
                Err(_) => break,
                Ok(Err(e)) => return Err(format!("reading READY: {e}")),
                Ok(Ok(0)) => return Err("QEMU closed the connection during the handshake".into()),
                Ok(Ok(n)) => n,
            };
            seen.extend_from_slice(&buf[..n]);
            if let Some(pos) = seen.windows(want.len()).position(|w| w == want.as_slice()) {
                return Ok(seen.split_off(pos + want.len()));
            }
            // Keep only what could be the start of a split READY.
            let keep = want.len() - 1;
            if seen.len() > keep {
                dropped += seen.len() - keep;
                seen.drain(..seen.len() - keep);
            }
        }
    }
}

fn new_nonce() -> [u8; NONCE_LEN] {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    let hex = format!("{:016x}", h.finish());
    let mut out = [0u8; NONCE_LEN];
    out.copy_from_slice(hex.as_bytes());
    out
}

/// The connection after the handshake: reads first yield `prefix` (bytes
/// that followed READY), writes are escaped (buffered until flushed; ttrpc
/// flushes after every frame).
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
    out: Vec<u8>,
    out_pos: usize,
}

impl<S: AsyncWrite + Unpin> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// Writes out the escaped bytes not yet written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Bounded buffering: take new bytes only when the previous are out.
        if self.out.len() >= 64 * 1024 {
            match self.poll_drain(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other.map(|r| r.map(|_| 0)),
            }
        }
        let this = &mut *self;
        escape_into(buf, &mut this.out);
        // Opportunistic: the rest goes out at the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_magics() {
        assert_eq!(&HELLO_MAGIC[..2], &[ESCAPE, 0x01]);
        assert!(!HELLO_MAGIC[1..].contains(&ESCAPE));
        assert_ne!(HELLO_MAGIC, READY_MAGIC);
        let mut out = Vec::new();
        escape_into(&[1, 0xff, 0xff, 2, 0xff], &mut out);
        assert_eq!(out, [1, 0xff, 0, 0xff, 0, 2, 0xff, 0]);
        out.clear();
        escape_into(b"", &mut out);
        assert!(out.is_empty());
        let n = new_nonce();
        assert!(n.iter().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(new_nonce(), n);
    }

    #[tokio::test]
    async fn handshake_skips_stale_bytes_and_other_nonces() {
        let dir = tempfile_dir();
        let sock = dir.join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut hello = [0u8; 32];
            s.read_exact(&mut hello).await.unwrap();
            assert_eq!(&hello[..16], &HELLO_MAGIC);
            // Stale response of a previous client, an old READY, then ours.
            let mut out = vec![0, 0, 0, 5, 0, 0, 0, 1, 2, 0, 1, 2, 3, 4, 5];
            out.extend_from_slice(&READY_MAGIC);
            out.extend_from_slice(b"0000000000000000");
            out.extend_from_slice(&READY_MAGIC);
            out.extend_from_slice(&hello[16..]);
            out.extend_from_slice(b"tail");
            s.write_all(&out).await.unwrap();
            s
        });
        let mut c = UnixStream::connect(&sock).await.unwrap();
        let nonce = new_nonce();
        let rest = handshake(&mut c, &nonce, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(rest, b"tail");
        drop(server.await.unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn connect_times_out_without_agent() {
        let dir = tempfile_dir();
        let sock = dir.join("none.sock");
        let _listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let err = AgentConn::connect(
            &sock,
            ConnOptions {
                connect_timeout: Duration::from_millis(300),
                ..Default::default()
            },
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, ClientError::Handshake { .. }), "{err}");
        assert!(err.to_string().contains("none.sock"));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "capsule-client-test-{}",
            String::from_utf8_lossy(&new_nonce())
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
