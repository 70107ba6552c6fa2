//! Pod networking for the VM tests: a pod namespace whose veth `eth0` has
//! its peer in a second ("host side") namespace, plumbed to the VM with
//! capsule-network; hotplug of the virtio-net device over QMP (`getfd` +
//! `netdev_add` + `device_add`, as the shim will); the SetupNetwork request
//! built from discovery (the translation the shim does); and probes run
//! from the peer namespace (ICMP echo, TCP). Nothing leaves the namespaces
//! the test made.
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use capsule_agent_protocol::agent::SetupNetworkRequest;
use capsule_network::{Netns, NetnsInfo, Plumbed};
use serde_json::json;

pub use capsule_network::testutil::TestNs;

/// The prefix of the VM tests' namespace names.
const NS: &str = "capvm";

/// Pod `eth0` 10.210.0.2/24 + fd00:210::2/64 (default routes via the
/// peer), peer `peer0` .1 and ::1, plus 10.211.0.1 on the peer's lo: only
/// reachable from the pod through its default route.
pub struct PodNet {
    pub pod: TestNs,
    pub peer: TestNs,
}

pub const POD_MAC: &str = "02:00:0a:d2:00:02";
pub const PEER_MAC: &str = "02:00:0a:d2:00:01";

impl PodNet {
    pub fn new(mtu: u32) -> Self {
        let pod = TestNs::new(NS, "pod");
        let peer = TestNs::new(NS, "peer");
        let mtu = mtu.to_string();
        pod.ip(&[
            "link", "add", "eth0", "mtu", &mtu, "address", POD_MAC, "type", "veth", "peer", "name",
            "peer0", "netns", &peer.name, "mtu", &mtu, "address", PEER_MAC,
        ]);
        pod.ip(&["addr", "add", "10.210.0.2/24", "dev", "eth0"]);
        pod.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:210::2/64",
            "dev",
            "eth0",
            "nodad",
        ]);
        peer.ip(&["addr", "add", "10.210.0.1/24", "dev", "peer0"]);
        peer.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:210::1/64",
            "dev",
            "peer0",
            "nodad",
        ]);
        peer.ip(&["addr", "add", "10.211.0.1/32", "dev", "lo"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        peer.ip(&["link", "set", "peer0", "up"]);
        pod.ip(&["route", "add", "default", "via", "10.210.0.1"]);
        pod.ip(&["-6", "route", "add", "default", "via", "fd00:210::1"]);
        pod.ip(&[
            "neigh",
            "add",
            "10.210.0.1",
            "lladdr",
            PEER_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        Self { pod, peer }
    }
}

/// SetupNetwork for `link` of the discovered namespace, built the way the
/// shim builds it (`capsule_shim::sandbox::network::setup_request`).
pub fn setup_request(info: &NetnsInfo, link: &str) -> SetupNetworkRequest {
    let l = info.link(link).expect("link in discovery");
    let rec = capsule_network::plan(&info.netns, l, 1).expect("plan");
    let plan = capsule_shim::sandbox::network::NetworkPlan {
        info: info.clone(),
        endpoints: vec![capsule_shim::sandbox::network::to_endpoint(&rec)],
    };
    let mut req = capsule_shim::sandbox::network::setup_request(&plan, Duration::ZERO);
    req.timeout_ms = 0;
    req
}

/// Hot-plugs a virtio-net device backed by the plumbed tap's queues:
/// `getfd` per queue, `netdev_add tap fds=a:b`, `device_add virtio-net-pci`
/// with the pod link's MAC and MTU (mq + vectors = 2N+2 with N > 1). On
/// `pc`, slot 0x1e of pci.0 (the last of the device manager's range, which
/// these tests' managers never reach).
pub async fn hotplug_nic(vm: &super::Vm, p: Plumbed, id: &str) {
    let qmp = vm.vm.qmp().await.expect("QMP");
    let n = p.queues.len();
    let mut names = Vec::new();
    for (q, fd) in p.queues.into_iter().enumerate() {
        let name = format!("{id}-q{q}");
        qmp.getfd(&name, fd).await.expect("getfd");
        names.push(name);
    }
    let mut netdev = json!({"type": "tap", "id": format!("{id}-net")});
    if n == 1 {
        netdev["fd"] = json!(names[0]);
    } else {
        netdev["fds"] = json!(names.join(":"));
    }
    qmp.execute("netdev_add", Some(netdev))
        .await
        .expect("netdev_add");
    let mut dev = json!({
        "driver": "virtio-net-pci",
        "id": id,
        "netdev": format!("{id}-net"),
        "mac": p.record.mac.to_string(),
        "host_mtu": p.record.mtu,
        "bus": "pci.0",
        "addr": "0x1e",
    });
    if n > 1 {
        dev["mq"] = json!(true);
        dev["vectors"] = json!(2 * n + 2);
    }
    qmp.execute("device_add", Some(dev))
        .await
        .expect("device_add");
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// ICMP (v4) or ICMPv6 echo from inside `ns` to `dst`; true when a reply
/// comes back within `within` (one request every 500 ms).
pub fn ping(ns: &Netns, dst: IpAddr, within: Duration) -> bool {
    ns.run_blocking(move || Ok(ping_here(dst, within)))
        .expect("ping in namespace")
}

fn ping_here(dst: IpAddr, within: Duration) -> bool {
    let (domain, proto, typ, reply) = match dst {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8, 0u8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8, 129u8),
    };
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by socket(2).
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = socket2_addr(dst);
    let id: u16 = (std::process::id() & 0xffff) as u16;
    let deadline = Instant::now() + within;
    let mut seq: u16 = 0;
    while Instant::now() < deadline {
        seq += 1;
        let mut pkt = vec![typ, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(b"capsule-ping");
        if dst.is_ipv4() {
            let c = checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
        } // ICMPv6: the kernel fills in the checksum.
          // SAFETY: `pkt` and `addr` are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                addr.0.as_ptr().cast(),
                addr.1,
            )
        };
        assert!(n >= 0, "sendto {dst}: {}", std::io::Error::last_os_error());
        let until = (Instant::now() + Duration::from_millis(500)).min(deadline);
        while Instant::now() < until {
            let mut pfd = libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = until.saturating_duration_since(Instant::now()).as_millis() as i32;
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, ms.max(1)) } <= 0 {
                continue;
            }
            let mut buf = [0u8; 1500];
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            let b = &buf[..n as usize];
            // Raw IPv4 sockets see the IP header; IPv6 ones do not.
            let icmp = if dst.is_ipv4() {
                let ihl = usize::from(b[0] & 0x0f) * 4;
                &b[ihl.min(b.len())..]
            } else {
                b
            };
            if icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == id.to_be_bytes() {
                return true;
            }
        }
    }
    false
}

/// A sockaddr for `ip` (port 0) as bytes and length.
fn socket2_addr(ip: IpAddr) -> (Vec<u8>, libc::socklen_t) {
    match ip {
        IpAddr::V4(v4) => {
            // SAFETY: sockaddr_in is plain old data.
            let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sa.sin_family = libc::AF_INET as u16;
            sa.sin_addr.s_addr = u32::from_ne_bytes(v4.octets());
            let len = std::mem::size_of::<libc::sockaddr_in>();
            // SAFETY: reading the bytes of a plain struct.
            let bytes = unsafe {
                std::slice::from_raw_parts((&sa as *const libc::sockaddr_in).cast::<u8>(), len)
            };
            (bytes.to_vec(), len as libc::socklen_t)
        }
        IpAddr::V6(v6) => {
            // SAFETY: sockaddr_in6 is plain old data.
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as u16;
            sa.sin6_addr.s6_addr = v6.octets();
            let len = std::mem::size_of::<libc::sockaddr_in6>();
            // SAFETY: reading the bytes of a plain struct.
            let bytes = unsafe {
                std::slice::from_raw_parts((&sa as *const libc::sockaddr_in6).cast::<u8>(), len)
            };
            (bytes.to_vec(), len as libc::socklen_t)
        }
    }
}

/// Connects from inside `ns` to `addr` (retrying until `within`) and reads
/// until the peer closes.
pub fn tcp_read(ns: &Netns, addr: SocketAddr, within: Duration) -> String {
    ns.run_blocking(move || {
        let deadline = Instant::now() + within;
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(mut s) => {
                    use std::io::Read;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let mut out = String::new();
                    s.read_to_string(&mut out)?;
                    return Ok(out);
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    })
    .unwrap_or_else(|e| panic!("TCP to {addr}: {e}"))
}

/// A listener inside `ns` at `addr`; the returned thread accepts one
/// connection and returns what was sent on it.
pub fn tcp_accept_one(
    ns: &Netns,
    addr: SocketAddr,
    within: Duration,
) -> std::thread::JoinHandle<String> {
    let l = ns
        .run_blocking(move || TcpListener::bind(addr))
        .expect("listen in namespace");
    std::thread::spawn(move || {
        use std::io::Read;
        l.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + within;
        loop {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    let mut out = String::new();
                    let _ = s.read_to_string(&mut out);
                    return out;
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return format!("no connection: {e}"),
            }
        }
    })
}
