//! The streaming side of CRI (Exec, Attach, PortForward): containerd's
//! streaming server (the kubelet's, vendored) listens on 127.0.0.1 inside the
//! node's network namespace and accepts websocket upgrades with the
//! `v4.channel.k8s.io` subprotocol. Every binary frame starts with its
//! channel: 0 stdin, 1 stdout, 2 stderr, 3 error (a JSON metav1.Status),
//! 4 resize; for port forwarding 0 data and 1 error, each channel's first
//! frame from the server starting with the port (u16, little endian).
//!
//! The TCP connection is made from a thread that entered the node's network
//! namespace (`setns` switches only the calling thread); the socket stays in
//! that namespace and is used from the caller's thread.
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

pub const PROTOCOL: &str = "v4.channel.k8s.io";
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;

/// Runs `f` on a thread inside the network namespace at `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = std::fs::File::open(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    let name = netns.display().to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {name}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("the thread in the node's network namespace panicked"))?
}

/// A TCP connection to `addr` made inside `netns`.
pub fn connect_in_netns(netns: &Path, addr: &str, timeout: Duration) -> Result<TcpStream> {
    let addr = addr.to_string();
    in_netns(netns, move || {
        let sa: std::net::SocketAddr = addr
            .parse()
            .with_context(|| format!("{addr:?} is not a socket address"))?;
        TcpStream::connect_timeout(&sa, timeout).with_context(|| format!("connecting to {addr}"))
    })
}

/// One websocket session with the streaming server.
pub struct Session {
    ws: WebSocket<TcpStream>,
    /// Bytes received per channel (the channel byte stripped).
    pub channels: BTreeMap<u8, Vec<u8>>,
    /// Frames received per channel.
    pub frames: BTreeMap<u8, usize>,
    /// The server closed the connection.
    pub closed: bool,
}

impl Session {
    /// Opens `url` (`http://HOST:PORT/PATH` as CRI returns it, plus any
    /// query) with the `v4.channel.k8s.io` subprotocol.
    pub fn open(netns: &Path, url: &str) -> Result<Session> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("streaming URL {url:?} is not http://"))?;
        let host = rest.split('/').next().unwrap_or_default();
        let stream = connect_in_netns(netns, host, Duration::from_secs(10))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut req = format!("ws://{rest}")
            .into_client_request()
            .with_context(|| format!("building a websocket request for {url}"))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            tungstenite::http::HeaderValue::from_static(PROTOCOL),
        );
        let (ws, resp) = tungstenite::client(req, stream)
            .map_err(|e| anyhow!("websocket handshake with {url}: {e}"))?;
        let proto = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if proto != PROTOCOL {
            bail!("the streaming server at {url} answered subprotocol {proto:?}, not {PROTOCOL}");
        }
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Session {
            ws,
            channels: BTreeMap::new(),
            frames: BTreeMap::new(),
            closed: false,
        })
    }

    /// Sends `data` on `channel`.
    pub fn send(&mut self, channel: u8, data: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(channel);
        frame.extend_from_slice(data);
        self.ws
            .send(Message::Binary(frame.into()))
            .map_err(|e| anyhow!("sending on channel {channel}: {e}"))
    }

    /// The text received on `channel` so far.
    pub fn text(&self, channel: u8) -> String {
        String::from_utf8_lossy(self.channels.get(&channel).map_or(&[][..], |v| v)).into_owned()
    }

    /// Reads frames until `done` holds or the server closes; fails after
    /// `timeout`.
    pub fn read_until(&mut self, timeout: Duration, done: impl Fn(&Session) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if self.closed {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nothing conclusive within {timeout:?}; received: {:?}",
                    self.summary()
                );
            }
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    if let Some((ch, data)) = b.split_first() {
                        self.channels
                            .entry(*ch)
                            .or_default()
                            .extend_from_slice(data);
                        *self.frames.entry(*ch).or_default() += 1;
                    }
                }
                Ok(Message::Close(_)) => self.closed = true,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => self.closed = true,
                Err(tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                )) => self.closed = true,
                Err(e) => bail!("reading from the streaming server: {e}"),
            }
        }
        Ok(())
    }

    /// Reads until the server closes the session.
    pub fn read_to_close(&mut self, timeout: Duration) -> Result<()> {
        self.read_until(timeout, |s| s.closed)
    }

    /// The error channel's status, parsed (the server writes it once, at the
    /// end).
    pub fn status(&self) -> Option<serde_json::Value> {
        let raw = self.channels.get(&ERROR)?;
        serde_json::from_slice(raw).ok()
    }

    /// The exit code the status reports: 0 for Success, the `ExitCode`
    /// cause for NonZeroExitCode.
    pub fn exit_code(&self) -> Option<i64> {
        let s = self.status()?;
        if s["status"] == "Success" {
            return Some(0);
        }
        s["details"]["causes"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")
            .and_then(|c| c["message"].as_str()?.parse().ok())
    }

    fn summary(&self) -> BTreeMap<u8, String> {
        self.channels
            .iter()
            .map(|(k, v)| (*k, String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}
