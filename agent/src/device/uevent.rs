//! Kernel uevents: the `NETLINK_KOBJECT_UEVENT` socket and the message parser.
//!
//! Events are only *wake-ups*: the watcher never remembers what an event said
//! about a device. Whoever waits re-reads sysfs, which is the truth (see
//! `super` docs). So a lost, spoofed or garbled event can delay a wait by at
//! most one poll interval and can never make it match the wrong device.
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recvfrom, setsockopt, socket, sockopt, AddressFamily, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

/// What happened to the device (`ACTION`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Add,
    Remove,
    Change,
    Move,
    Online,
    Offline,
    Bind,
    Unbind,
    Other(String),
}

impl Action {
    fn parse(s: &str) -> Self {
        match s {
            "add" => Self::Add,
            "remove" => Self::Remove,
            "change" => Self::Change,
            "move" => Self::Move,
            "online" => Self::Online,
            "offline" => Self::Offline,
            "bind" => Self::Bind,
            "unbind" => Self::Unbind,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// One kernel uevent: `ACTION@DEVPATH\0KEY=VALUE\0...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub action: Action,
    /// Path under `/sys`, starting with `/` (`/devices/pci0000:00/...`).
    pub devpath: String,
    /// The `KEY=VALUE` pairs in message order.
    pub env: Vec<(String, String)>,
}

/// Why a datagram is not a kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UeventParseError {
    #[error("empty message")]
    Empty,
    #[error("udev (libudev) message, not from the kernel")]
    Udev,
    #[error("header {0:?} is not ACTION@/DEVPATH")]
    BadHeader(String),
}

impl Uevent {
    /// Parses one datagram. Never panics, whatever the bytes: the header must
    /// be UTF-8 `ACTION@/DEVPATH`; `KEY=VALUE` fields that are not (no `=`,
    /// empty key) are skipped, values are decoded lossily.
    pub fn parse(buf: &[u8]) -> Result<Self, UeventParseError> {
        let mut fields = buf.split(|b| *b == 0);
        let header = fields.next().unwrap_or_default();
        if header.is_empty() {
            return Err(UeventParseError::Empty);
        }
        if header == b"libudev" {
            return Err(UeventParseError::Udev);
        }
        let bad = || UeventParseError::BadHeader(String::from_utf8_lossy(header).into_owned());
        let header = std::str::from_utf8(header).map_err(|_| bad())?;
        let (action, devpath) = header.split_once('@').ok_or_else(bad)?;
        if action.is_empty() || !devpath.starts_with('/') {
            return Err(bad());
        }
        let env = fields
            .filter_map(|f| {
                let eq = f.iter().position(|b| *b == b'=')?;
                let (k, v) = (&f[..eq], &f[eq + 1..]);
                (!k.is_empty()).then(|| {
                    (
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
            })
            .collect();
        Ok(Self {
            action: Action::parse(action),
            devpath: devpath.to_owned(),
            env,
        })
    }

    /// The value of `key`, if present (the first one).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The kernel's uevent multicast group.
const KERNEL_GROUP: u32 = 1;
/// Receive buffer asked for, so a burst (a bridge full of hot-plugged
/// functions) is not dropped; `ENOBUFS` is handled anyway.
const RCVBUF: usize = 4 << 20;

/// Opens a non-blocking `NETLINK_KOBJECT_UEVENT` socket bound to the kernel group.
pub(crate) fn open_socket() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    // RcvBufForce needs CAP_NET_ADMIN; fall back to the capped RcvBuf.
    if setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF).is_err() {
        // A smaller buffer only makes overruns (handled by rescans) likelier.
        if let Err(e) = setsockopt(&fd, sockopt::RcvBuf, &RCVBUF) {
            tracing::warn!(error = %e, "uevent socket: cannot raise the receive buffer");
        }
    }
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
    Ok(fd)
}

/// What one read from the socket gave.
pub(crate) enum Received {
    /// A datagram from the kernel (port id 0).
    Kernel(usize),
    /// A datagram from a user-space sender: ignored.
    Foreign,
    /// The receive queue overflowed: events were lost.
    Overflow,
}

/// One `recvfrom` on the (non-blocking) socket. `WouldBlock` comes back as an
/// `io::Error` so it fits `AsyncFd::try_io`.
pub(crate) fn receive(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Received> {
    match recvfrom::<NetlinkAddr>(fd.as_raw_fd(), buf) {
        Ok((n, Some(addr))) if addr.pid() == 0 => Ok(Received::Kernel(n)),
        Ok(_) => Ok(Received::Foreign),
        Err(Errno::ENOBUFS) => Ok(Received::Overflow),
        Err(e) => Err(e.into()),
    }
}
