//! Fixtures for the network tests (root): namespaces and links made with
//! `ip`/`tc`, removed on drop, and raw Ethernet I/O (AF_PACKET sockets and
//! tap queues). Frames use the local experimental EtherType 0x88b5 and
//! never leave the namespaces the test made.
#![allow(dead_code)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use capsule_network::{MacAddr, Netns};

pub const ETHERTYPE: u16 = 0x88b5;
/// `struct virtio_net_hdr` (IFF_VNET_HDR's default header size).
pub const VNET_HDR_LEN: usize = 10;

pub use capsule_network::testutil::TestNs;

/// The prefix of these tests' namespace names.
pub const NS: &str = "capnet";

/// A pod namespace with `eth0` (veth) whose peer `peer0` sits in a second
/// namespace, like a CNI bridge's host side. Addresses: pod 10.200.0.2/24
/// and fd00:200::2/64, peer .1 and ::1; both up.
pub struct PodNet {
    pub pod: TestNs,
    pub peer: TestNs,
    pub pod_mac: MacAddr,
    pub peer_mac: MacAddr,
}

impl PodNet {
    pub fn new(mtu: u32) -> Self {
        let pod = TestNs::new(NS, "pod");
        let peer = TestNs::new(NS, "peer");
        let mtu = mtu.to_string();
        pod.ip(&[
            "link",
            "add",
            "eth0",
            "mtu",
            &mtu,
            "address",
            "02:00:0a:c8:00:02",
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
            "netns",
            &peer.name,
            "mtu",
            &mtu,
            "address",
            "02:00:0a:c8:00:01",
        ]);
        pod.ip(&["addr", "add", "10.200.0.2/24", "dev", "eth0"]);
        pod.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:200::2/64",
            "dev",
            "eth0",
            "nodad",
        ]);
        peer.ip(&["addr", "add", "10.200.0.1/24", "dev", "peer0"]);
        peer.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:200::1/64",
            "dev",
            "peer0",
            "nodad",
        ]);
        pod.ip(&["link", "set", "eth0", "up"]);
        peer.ip(&["link", "set", "peer0", "up"]);
        let pod_mac = pod.mac("eth0");
        let peer_mac = peer.mac("peer0");
        Self {
            pod,
            peer,
            pod_mac,
            peer_mac,
        }
    }
}

/// An AF_PACKET socket bound to `ifname` inside `ns`, seeing every frame.
pub fn packet_socket(ns: &Netns, ifname: &str) -> OwnedFd {
    let ifname = std::ffi::CString::new(ifname).unwrap();
    ns.run_blocking(move || {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned here.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `ifname` is a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
        if index == 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain old data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(sock)
    })
    .unwrap()
}

/// An Ethernet frame carrying `token`.
pub fn frame(dst: MacAddr, src: MacAddr, token: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(token);
    while f.len() < 60 {
        f.push(0);
    }
    f
}

/// Writes `data` in one write(2).
pub fn write_all(fd: BorrowedFd<'_>, data: &[u8]) {
    // SAFETY: `data` is valid for reads of its length.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    assert_eq!(
        n,
        data.len() as isize,
        "write: {}",
        std::io::Error::last_os_error()
    );
}

/// Reads from any of `fds` until a frame carrying `token` arrives (after
/// skipping `skip` bytes of header); returns it, or None at the deadline.
pub fn wait_frame(
    fds: &[BorrowedFd<'_>],
    skip: usize,
    token: &[u8],
    within: Duration,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 65536 + VNET_HDR_LEN];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `pfds` is a valid array of the length passed.
        let r = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                left.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
        for p in pfds.iter().filter(|p| p.revents & libc::POLLIN != 0) {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) };
            assert!(n >= 0, "read: {}", std::io::Error::last_os_error());
            let got = &buf[..n as usize];
            if got.len() > skip + 14 {
                let eth = &got[skip..];
                if eth[12..14] == ETHERTYPE.to_be_bytes()
                    && eth[14..].windows(token.len()).any(|w| w == token)
                {
                    return Some(eth.to_vec());
                }
            }
        }
    }
}

/// A unique token for one frame.
pub fn token(what: &str) -> Vec<u8> {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "capsule-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

pub fn borrow(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}
