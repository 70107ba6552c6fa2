//! ttrpc over the virtio-serial port, surviving host reconnects.
//!
//! The guest can open the port only once, and it is one byte stream for the
//! guest's whole life. Under QEMU (virtio_console), while no host client is
//! connected a read returns 0 at once, poll(2) reports POLLHUP, and a write
//! blocks until a client connects.
//!
//! Two plain threads own the fd (blocking I/O, no epoll edge cases):
//! - the reader runs the [`Deframer`]: a HELLO starts a *session*, which is
//!   handed to the ttrpc server as a new connection ([`SerialConn`]); bytes go
//!   to the current session; EOF (host gone) or garbage ends it, and the
//!   reader then polls every 100 ms until POLLHUP clears (host back);
//! - the writer writes what sessions send, dropping anything of a session
//!   that is no longer current, so a new client never receives an old
//!   session's frames (the bytes of a write that was already blocked in the
//!   kernel do arrive; the client drops them while waiting for READY).
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::task::{Context, Poll};
use std::time::Duration;

use capsule_agent_protocol::client::READY_MAGIC;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use super::deframe::{Deframer, Event};

/// What the threads need from the port; a trait so tests can fake QEMU.
pub trait Port: Send + Sync + 'static {
    /// Blocking read; `Ok(0)` means no host is connected.
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Blocking write of everything (blocks while no host is connected).
    fn write_all(&self, data: &[u8]) -> io::Result<()>;
    /// Returns once a host is connected (or may be: a spurious return just
    /// leads to another EOF).
    fn wait_host(&self);
}

/// The real port: `/dev/vportNpM`, opened once.
pub struct DevicePort {
    file: std::fs::File,
}

impl DevicePort {
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(Self { file })
    }
}

impl Port for DevicePort {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }
    fn write_all(&self, data: &[u8]) -> io::Result<()> {
        (&self.file).write_all(data)
    }
    fn wait_host(&self) {
        use std::os::fd::AsFd;
        loop {
            let mut fds = [nix::poll::PollFd::new(
                self.file.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let r = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
            let hup = fds[0]
                .revents()
                .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLHUP));
            match r {
                Ok(_) if !hup => return,
                Err(nix::errno::Errno::EINTR) => continue,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

struct WriteMsg {
    session: u64,
    data: Vec<u8>,
}

/// One host session, as a ttrpc connection.
pub struct SerialConn {
    session: u64,
    current: Arc<AtomicU64>,
    rx: mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    pos: usize,
    tx: std_mpsc::Sender<WriteMsg>,
}

impl AsyncRead for SerialConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.pos < self.pending.len() {
                let n = (self.pending.len() - self.pos).min(buf.remaining());
                let start = self.pos;
                buf.put_slice(&self.pending[start..start + n]);
                self.pos += n;
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(v)) => {
                    self.pending = v;
                    self.pos = 0;
                }
                // Session over: EOF.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for SerialConn {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.current.load(Ordering::SeqCst) != self.session {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "serial session ended",
            )));
        }
        let msg = WriteMsg {
            session: self.session,
            data: buf.to_vec(),
        };
        match self.tx.send(msg) {
            Ok(()) => Poll::Ready(Ok(buf.len())),
            Err(_) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "serial writer gone",
            ))),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Starts the reader and writer threads on `port`; the listener yields one
/// [`SerialConn`] per host session.
pub fn listen(port: impl Port) -> ttrpc::r#async::transport::Listener {
    let port = Arc::new(port);
    let current = Arc::new(AtomicU64::new(0));
    let (wtx, wrx) = std_mpsc::channel::<WriteMsg>();
    let (ctx, crx) = mpsc::unbounded_channel::<SerialConn>();
    {
        let port = port.clone();
        let current = current.clone();
        spawn_thread("serial-writer", move || writer(&*port, &current, wrx));
    }
    spawn_thread("serial-reader", move || reader(&*port, current, wtx, ctx));
    let stream = futures::stream::unfold(crx, |mut rx| async move {
        rx.recv().await.map(|c| (Ok::<_, io::Error>(c), rx))
    });
    ttrpc::r#async::transport::Listener::new(stream)
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        tracing::error!(thread = name, error = %e, "cannot start serial thread");
    }
}

fn writer(port: &dyn Port, current: &AtomicU64, rx: std_mpsc::Receiver<WriteMsg>) {
    while let Ok(msg) = rx.recv() {
        if msg.session != current.load(Ordering::SeqCst) {
            continue;
        }
        if let Err(e) = port.write_all(&msg.data) {
            tracing::warn!(error = %e, "serial write failed");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn reader(
    port: &dyn Port,
    current: Arc<AtomicU64>,
    wtx: std_mpsc::Sender<WriteMsg>,
    conns: mpsc::UnboundedSender<SerialConn>,
) {
    let mut deframer = Deframer::new();
    let mut session: Option<mpsc::Sender<Vec<u8>>> = None;
    let mut next_id = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut eofs = 0u32;
    loop {
        let n = match port.read(&mut buf) {
            Ok(0) => {
                if session.take().is_some() {
                    tracing::info!(
                        session = current.load(Ordering::SeqCst),
                        "host disconnected"
                    );
                }
                current.store(0, Ordering::SeqCst);
                deframer.disconnect();
                // Should wait_host return while the host is still away, do
                // not spin on EOF.
                eofs += 1;
                if eofs > 1 {
                    std::thread::sleep(Duration::from_millis(100));
                }
                port.wait_host();
                continue;
            }
            Ok(n) => {
                eofs = 0;
                n
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "serial read failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        for ev in deframer.feed(&buf[..n]) {
            match ev {
                Event::Data(d) => {
                    let Some(tx) = &session else { continue };
                    if tx.blocking_send(d).is_err() {
                        // ttrpc dropped the connection: wait for a new HELLO.
                        tracing::warn!("ttrpc closed the serial session; waiting for a new client");
                        session = None;
                        current.store(0, Ordering::SeqCst);
                        deframer.disconnect();
                    }
                }
                Event::Session(nonce) => {
                    next_id += 1;
                    current.store(next_id, Ordering::SeqCst);
                    let mut ready = READY_MAGIC.to_vec();
                    ready.extend_from_slice(&nonce);
                    let _ = wtx.send(WriteMsg {
                        session: next_id,
                        data: ready,
                    });
                    let (tx, rx) = mpsc::channel(64);
                    session = Some(tx);
                    let conn = SerialConn {
                        session: next_id,
                        current: current.clone(),
                        rx,
                        pending: Vec::new(),
                        pos: 0,
                        tx: wtx.clone(),
                    };
                    tracing::info!(session = next_id, "host connected");
                    if conns.send(conn).is_err() {
                        tracing::error!("ttrpc listener gone");
                        return;
                    }
                }
                Event::Garbage(why) => {
                    tracing::warn!(
                        why,
                        "invalid bytes on the serial port; waiting for a new client"
                    );
                    session = None;
                    current.store(0, Ordering::SeqCst);
                }
            }
        }
    }
}
