//! A small asynchronous QMP client.
//!
//! One reader task owns the socket's read half: it matches replies to
//! commands by `id` and forwards events to a broadcast channel. One writer
//! task owns the write half, so a caller dropping its future never leaves a
//! half-written line. Every command has a deadline. When the connection
//! drops, every pending command fails at once with
//! [`QmpError::Disconnected`] and so does every later one.
use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

mod commands;
pub mod error;
pub mod types;

pub use error::QmpError;
pub use types::*;

/// Default deadline of a QMP command.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest QMP message accepted (query-pci of a big VM is a few hundred KiB).
const MAX_MESSAGE: u64 = 16 << 20;
/// Events buffered per subscriber before it starts lagging.
const EVENT_BUFFER: usize = 512;

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub struct QmpOptions {
    /// Deadline of every command without an explicit one.
    pub command_timeout: Duration,
    /// Deadline for the connect + greeting + `qmp_capabilities` handshake.
    pub handshake_timeout: Duration,
}

impl Default for QmpOptions {
    fn default() -> Self {
        Self {
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// A connected, negotiated QMP session. Cheap to clone; the connection
/// closes when the last clone is dropped.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("connected", &self.is_connected())
            .field("version", &self.inner.version)
            .finish()
    }
}

struct Inner {
    shared: Arc<Shared>,
    writes: mpsc::UnboundedSender<Outgoing>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    next_id: AtomicU64,
    default_timeout: Duration,
    version: Value,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
        self.shared.close("client dropped", CloseKind::Disconnected);
    }
}

enum Outgoing {
    Line {
        line: Vec<u8>,
        fd: Option<OwnedFd>,
    },
    /// Close the socket (see [`QmpClient::close`]).
    Close,
}

struct Pending {
    command: String,
    reply: oneshot::Sender<Result<Value, QmpError>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Why the connection closed, once it has.
    closed: Option<String>,
}

enum CloseKind {
    Disconnected,
    Protocol,
}

struct Shared {
    state: StdMutex<State>,
    closed_tx: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the connection closed and fails every pending command.
    fn close(&self, reason: &str, kind: CloseKind) {
        let drained: Vec<Pending> = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(reason.to_owned());
            }
            st.pending.drain().map(|(_, p)| p).collect()
        };
        for p in drained {
            let err = match kind {
                CloseKind::Disconnected => QmpError::Disconnected {
                    command: Some(p.command),
                    reason: reason.to_owned(),
                },
                CloseKind::Protocol => {
                    QmpError::Protocol(format!("{reason} (while waiting for {})", p.command))
                }
            };
            let _ = p.reply.send(Err(err));
        }
        self.closed_tx.send_replace(true);
    }

    fn closed_reason(&self) -> Option<String> {
        self.lock().closed.clone()
    }
}

/// Removes a pending entry when the command finishes, times out or is
/// cancelled, so a late reply is recognised as such.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

impl QmpClient {
    /// Connects to a QMP unix socket and negotiates capabilities.
    pub async fn connect(path: &Path, opts: QmpOptions) -> Result<Self, QmpError> {
        let stream = tokio::time::timeout(opts.handshake_timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                command: format!("connect {}", path.display()),
                timeout: opts.handshake_timeout,
            })?
            .map_err(|source| QmpError::Io {
                context: format!("connect {}", path.display()),
                source,
            })?;
        Self::handshake(stream, opts).await
    }

    /// Runs the greeting + `qmp_capabilities` handshake on a connected stream.
    pub async fn handshake(stream: UnixStream, opts: QmpOptions) -> Result<Self, QmpError> {
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = tokio::time::timeout(opts.handshake_timeout, read_message(&mut reader))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting".into(),
                timeout: opts.handshake_timeout,
            })?
            .map_err(|e| match e {
                ReadError::Eof => QmpError::Disconnected {
                    command: Some("greeting".into()),
                    reason: "QEMU closed the QMP socket before its greeting".into(),
                },
                ReadError::Io(source) => QmpError::Io {
                    context: "read greeting".into(),
                    source,
                },
                ReadError::TooLong => {
                    QmpError::Protocol("greeting longer than the message limit".into())
                }
            })?;
        let greeting: Value = serde_json::from_slice(&greeting)
            .map_err(|e| QmpError::Protocol(format!("greeting is not JSON: {e}")))?;
        let version = greeting
            .get("QMP")
            .map(|q| q.get("version").cloned().unwrap_or(Value::Null))
            .ok_or_else(|| {
                QmpError::Protocol(format!(
                    "expected the QMP greeting, got {}",
                    truncate(&greeting)
                ))
            })?;

        let (closed_tx, closed_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: StdMutex::new(State::default()),
            closed_tx,
        });
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (writes, write_rx) = mpsc::unbounded_channel();
        tokio::spawn(writer_task(write, write_rx, shared.clone()));
        let reader = tokio::spawn(reader_task(reader, shared.clone(), events.clone()));
        let client = QmpClient {
            inner: Arc::new(Inner {
                shared,
                writes,
                events,
                closed: closed_rx,
                next_id: AtomicU64::new(1),
                default_timeout: opts.command_timeout,
                version,
                reader,
            }),
        };
        client
            .execute_with_timeout("qmp_capabilities", None, opts.handshake_timeout)
            .await?;
        tracing::debug!(version = %client.inner.version, "QMP session negotiated");
        Ok(client)
    }

    /// QEMU's version object from the greeting.
    pub fn version(&self) -> &Value {
        &self.inner.version
    }

    /// The deadline used by [`execute`](Self::execute).
    pub fn default_timeout(&self) -> Duration {
        self.inner.default_timeout
    }

    pub fn is_connected(&self) -> bool {
        !*self.inner.closed.borrow()
    }

    /// Closes the connection now, for every clone: pending and later
    /// commands fail with [`QmpError::Disconnected`]. QEMU serves one QMP
    /// client at a time, so this is how a process hands the VM over.
    pub fn close(&self) {
        self.inner
            .shared
            .close("closed by capsule", CloseKind::Disconnected);
        self.inner.reader.abort();
        let _ = self.inner.writes.send(Outgoing::Close);
    }

    /// Resolves once the connection is closed.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.clone();
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// A stream of every event received from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.inner.events.subscribe()
    }

    /// Runs a command with the default deadline; returns its `return` value.
    pub async fn execute(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, args, self.inner.default_timeout)
            .await
    }

    /// Runs a command with an explicit deadline.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send(command, args, None, timeout).await
    }

    /// Runs a command and deserializes its `return` value.
    pub async fn call<T: DeserializeOwned>(
        &self,
        command: &str,
        args: Option<Value>,
    ) -> Result<T, QmpError> {
        let value = self.execute(command, args).await?;
        serde_json::from_value(value)
            .map_err(|e| QmpError::Protocol(format!("unexpected reply to {command}: {e}")))
    }

    /// `getfd`: hands `fd` to QEMU under `name` (SCM_RIGHTS on the monitor
    /// socket). The name is valid on this connection only.
    pub async fn getfd(&self, name: &str, fd: OwnedFd) -> Result<(), QmpError> {
        self.send(
            "getfd",
            Some(json!({ "fdname": name })),
            Some(fd),
            self.inner.default_timeout,
        )
        .await
        .map(drop)
    }

    async fn send(
        &self,
        command: &str,
        args: Option<Value>,
        fd: Option<OwnedFd>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let shared = &self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = shared.lock();
            if let Some(reason) = &st.closed {
                return Err(QmpError::Disconnected {
                    command: Some(command.to_owned()),
                    reason: reason.clone(),
                });
            }
            st.pending.insert(
                id,
                Pending {
                    command: command.to_owned(),
                    reply: tx,
                },
            );
        }
        let _guard = PendingGuard { shared, id };
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg)
            .map_err(|e| QmpError::Protocol(format!("cannot encode {command}: {e}")))?;
        line.push(b'\n');
        tracing::trace!(command, id, "QMP send");
        if self.inner.writes.send(Outgoing::Line { line, fd }).is_err() {
            let reason = shared
                .closed_reason()
                .unwrap_or_else(|| "writer stopped".into());
            return Err(QmpError::Disconnected {
                command: Some(command.to_owned()),
                reason,
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result.map_err(|e| e.during(command)),
            Ok(Err(_)) => Err(QmpError::Disconnected {
                command: Some(command.to_owned()),
                reason: shared
                    .closed_reason()
                    .unwrap_or_else(|| "reader stopped".into()),
            }),
            Err(_) => {
                tracing::warn!(command, id, ?timeout, "QMP command timed out");
                Err(QmpError::Timeout {
                    command: command.to_owned(),
                    timeout,
                })
            }
        }
    }
}

fn truncate(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

enum ReadError {
    Eof,
    TooLong,
    Io(io::Error),
}

/// Reads one newline-terminated message, without the line ending.
async fn read_message(reader: &mut BufReader<OwnedReadHalf>) -> Result<Vec<u8>, ReadError> {
    loop {
        let mut buf = Vec::new();
        let n = reader
            .take(MAX_MESSAGE)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Eof);
        }
        if buf.last() != Some(&b'\n') {
            return Err(if n as u64 >= MAX_MESSAGE {
                ReadError::TooLong
            } else {
                ReadError::Eof
            });
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        if !buf.iter().all(u8::is_ascii_whitespace) {
            return Ok(buf);
        }
    }
}

async fn reader_task(
    mut reader: BufReader<OwnedReadHalf>,
    shared: Arc<Shared>,
    events: broadcast::Sender<QmpEvent>,
) {
    loop {
        let line = match read_message(&mut reader).await {
            Ok(line) => line,
            Err(ReadError::Eof) => {
                tracing::debug!("QMP socket closed by QEMU");
                shared.close("QEMU closed the QMP socket", CloseKind::Disconnected);
                return;
            }
            Err(ReadError::TooLong) => {
                shared.close("message longer than 16 MiB", CloseKind::Protocol);
                return;
            }
            Err(ReadError::Io(e)) => {
                shared.close(&format!("read error: {e}"), CloseKind::Disconnected);
                return;
            }
        };
        match parse_message(&line) {
            Ok(msg) => dispatch(msg, &shared, &events),
            Err(reason) => {
                tracing::error!(%reason, "dropping the QMP connection");
                shared.close(&reason, CloseKind::Protocol);
                return;
            }
        }
    }
}

/// One message from QEMU, decoded by [`parse_message`].
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// The reply to the command with `id` (`None`: no numeric id, so it
    /// cannot be matched and is ignored): its `return` value, or the
    /// `class` and `desc` of its `error` (`"(none)"` when missing).
    Reply {
        id: Option<u64>,
        result: Result<Value, (String, String)>,
    },
    /// An asynchronous event.
    Event(QmpEvent),
    /// A message that is ignored (an event of unexpected shape, or neither
    /// a reply nor an event), with the reason.
    Ignored(String),
}

/// Decodes one QMP message: a line without its newline. Pure; never
/// panics, whatever the bytes. An error means the stream cannot be trusted
/// any more (not JSON, or not a JSON object) and the connection is dropped.
pub fn parse_message(line: &[u8]) -> Result<QmpMessage, String> {
    let msg = match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(map)) => Value::Object(map),
        Ok(other) => {
            return Err(format!(
                "QEMU sent a message that is not a JSON object: {}",
                truncate(&other)
            ))
        }
        Err(e) => {
            let text = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
            return Err(format!("malformed JSON from QEMU ({e}): {text:?}"));
        }
    };
    if msg.get("event").is_some() {
        return Ok(match serde_json::from_value::<QmpEvent>(msg) {
            Ok(event) => QmpMessage::Event(event),
            Err(e) => QmpMessage::Ignored(format!("an event of unexpected shape: {e}")),
        });
    }
    let result = if let Some(ret) = msg.get("return") {
        Ok(ret.clone())
    } else if let Some(err) = msg.get("error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or("(none)")
                .to_owned()
        };
        Err((field("class"), field("desc")))
    } else {
        return Ok(QmpMessage::Ignored(format!(
            "neither reply nor event: {}",
            truncate(&msg)
        )));
    };
    Ok(QmpMessage::Reply {
        id: msg.get("id").and_then(Value::as_u64),
        result,
    })
}

fn dispatch(msg: QmpMessage, shared: &Shared, events: &broadcast::Sender<QmpEvent>) {
    let (id, result) = match msg {
        QmpMessage::Event(event) => {
            tracing::debug!(event = %event.event, data = %event.data, "QMP event");
            // No subscriber is fine: nobody waits for this event.
            let _ = events.send(event);
            return;
        }
        QmpMessage::Ignored(why) => {
            tracing::warn!(%why, "ignoring a QMP message");
            return;
        }
        QmpMessage::Reply { id: None, result } => {
            tracing::warn!(
                ok = result.is_ok(),
                "ignoring a QMP reply without a numeric id"
            );
            return;
        }
        QmpMessage::Reply {
            id: Some(id),
            result,
        } => (id, result),
    };
    let pending = shared.lock().pending.remove(&id);
    let Some(pending) = pending else {
        tracing::debug!(id, "late QMP reply for a command that already timed out");
        return;
    };
    let result = result.map_err(|(class, desc)| QmpError::Command {
        command: pending.command.clone(),
        class,
        desc,
    });
    tracing::trace!(command = %pending.command, id, ok = result.is_ok(), "QMP reply");
    let _ = pending.reply.send(result);
}

async fn writer_task(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    while let Some(out) = rx.recv().await {
        let res = match out {
            Outgoing::Close => break,
            Outgoing::Line { line, fd: None } => write.write_all(&line).await,
            Outgoing::Line { line, fd: Some(fd) } => send_with_fd(&mut write, &line, &fd).await,
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "QMP write failed");
            shared.close(&format!("write error: {e}"), CloseKind::Disconnected);
            return;
        }
    }
    let _ = write.shutdown().await;
}

/// Writes `line` with `fd` attached to its first byte (SCM_RIGHTS).
async fn send_with_fd(write: &mut OwnedWriteHalf, line: &[u8], fd: &OwnedFd) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let stream: &UnixStream = write.as_ref();
    let fds = [fd.as_raw_fd()];
    let sent = loop {
        stream.writable().await?;
        let res = stream.try_io(Interest::WRITABLE, || {
            sendmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &[IoSlice::new(line)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match res {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    write.write_all(&line[sent..]).await
}

#[cfg(test)]
mod tests;
