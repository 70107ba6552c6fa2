//! Discovery against real namespaces (root): what `ip` set up is what
//! discovery reports, and paths that are not network namespaces are
//! refused with a clear error.
mod common;

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use capsule_network::*;
use common::*;

const T: Duration = Duration::from_secs(5);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn prefix(s: &str) -> IpPrefix {
    let (a, l) = s.split_once('/').unwrap();
    IpPrefix::new(ip(a), l.parse().unwrap()).unwrap()
}

#[tokio::test]
async fn reports_links_addresses_routes_and_neighbours() {
    let net = PodNet::new(1400);
    let pod = &net.pod;
    pod.ip(&["route", "add", "default", "via", "10.200.0.1"]);
    pod.ip(&[
        "route",
        "add",
        "10.201.0.0/16",
        "via",
        "10.200.0.1",
        "metric",
        "50",
    ]);
    pod.ip(&["route", "add", "192.0.2.1", "dev", "eth0", "scope", "link"]);
    pod.ip(&["-6", "route", "add", "default", "via", "fd00:200::1"]);
    pod.ip(&[
        "neigh",
        "add",
        "10.200.0.1",
        "lladdr",
        "02:00:0a:c8:00:01",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    pod.ip(&[
        "-6",
        "neigh",
        "add",
        "fd00:200::1",
        "lladdr",
        "02:00:0a:c8:00:01",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    // A stale/failed entry is not reported.
    pod.ip(&[
        "neigh",
        "add",
        "10.200.0.9",
        "lladdr",
        "02:00:00:00:00:09",
        "dev",
        "eth0",
        "nud",
        "stale",
    ]);

    let info = discover(&pod.path, T).await.unwrap();
    assert_eq!(info.netns, pod.path);

    let lo = info.link("lo").expect("lo");
    assert_eq!(lo.kind, LinkKind::Loopback);
    assert_eq!(lo.mac, None);
    assert!(!lo.is_l2_endpoint());
    assert!(lo
        .addresses
        .iter()
        .any(|a| a.prefix == prefix("127.0.0.1/8")));

    let eth0 = info.link("eth0").expect("eth0");
    assert_eq!(eth0.kind, LinkKind::Veth);
    assert_eq!(eth0.mac, Some(net.pod_mac));
    assert_eq!(eth0.mac.unwrap().to_string(), "02:00:0a:c8:00:02");
    assert_eq!(eth0.mtu, 1400);
    assert!(eth0.up);
    assert_eq!(eth0.oper_state, OperState::Up);
    let v4 = eth0
        .addresses
        .iter()
        .find(|a| a.prefix == prefix("10.200.0.2/24"))
        .expect("IPv4 address");
    assert_eq!(v4.scope, Scope::Universe);
    assert!(!v4.link_local);
    let v6 = eth0
        .addresses
        .iter()
        .find(|a| a.prefix == prefix("fd00:200::2/64"))
        .expect("IPv6 address");
    assert!(!v6.link_local && !v6.tentative);
    // The kernel's own link-local address is reported, marked as such.
    let ll = eth0
        .addresses
        .iter()
        .find(|a| a.link_local)
        .expect("an IPv6 link-local address");
    assert_eq!(ll.prefix.prefix_len, 64);
    assert_eq!(ll.scope, Scope::Link);

    let eps: Vec<&str> = info.endpoints().map(|l| l.name.as_str()).collect();
    assert_eq!(eps, ["eth0"]);

    let routes: Vec<&Route> = info.routes_of(eth0).collect();
    let find = |dst: Option<&str>, fam: Family| {
        routes
            .iter()
            .find(|r| r.family == fam && r.destination == dst.map(prefix))
            .unwrap_or_else(|| panic!("no route to {dst:?} ({fam:?}) in {routes:#?}"))
    };
    let def4 = find(None, Family::V4);
    assert!(def4.is_default());
    assert_eq!(def4.gateway, Some(ip("10.200.0.1")));
    assert_eq!(def4.device.as_deref(), Some("eth0"));
    assert_eq!(def4.scope, Scope::Universe);
    let net4 = find(Some("10.200.0.0/24"), Family::V4);
    assert!(net4.is_kernel_made());
    assert_eq!(net4.scope, Scope::Link);
    assert_eq!(net4.source, Some(ip("10.200.0.2")));
    assert_eq!(net4.gateway, None);
    let via = find(Some("10.201.0.0/16"), Family::V4);
    assert_eq!(via.gateway, Some(ip("10.200.0.1")));
    assert_eq!(via.metric, Some(50));
    let host = find(Some("192.0.2.1/32"), Family::V4);
    assert_eq!(host.scope, Scope::Link);
    let def6 = find(None, Family::V6);
    assert_eq!(def6.gateway, Some(ip("fd00:200::1")));
    find(Some("fd00:200::/64"), Family::V6);
    // Only main-table unicast routes: no local/broadcast entries.
    assert!(info
        .routes
        .iter()
        .all(|r| r.destination != Some(prefix("10.200.0.2/32"))));

    let neigh: Vec<&Neighbour> = info.neighbours_of(eth0).collect();
    assert_eq!(neigh.len(), 2, "{neigh:#?}");
    for want in ["10.200.0.1", "fd00:200::1"] {
        let n = neigh.iter().find(|n| n.ip == ip(want)).expect(want);
        assert_eq!(n.mac, net.peer_mac);
        assert_eq!(n.state, NeighbourState::Permanent);
        assert_eq!(n.device, "eth0");
    }

    // The record round-trips through JSON (what the shim persists).
    let json = serde_json::to_string(&info).unwrap();
    let back: NetnsInfo = serde_json::from_str(&json).unwrap();
    assert_eq!(back, info);
}

#[tokio::test]
async fn reports_link_kinds_and_which_are_endpoints() {
    let ns = TestNs::new(common::NS, "kinds");
    ns.ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"]);
    ns.ip(&[
        "link", "add", "mv0", "link", "va", "type", "macvlan", "mode", "bridge",
    ]);
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["link", "set", "vb", "master", "br0"]);
    ns.ip(&["tuntap", "add", "tp0", "mode", "tap"]);
    ns.ip(&["tuntap", "add", "tn0", "mode", "tun"]);
    ns.ip(&[
        "link", "add", "vx0", "type", "vxlan", "id", "5", "dstport", "4789",
    ]);
    let info = discover(&ns.path, T).await.unwrap();
    let kind = |n: &str| info.link(n).unwrap_or_else(|| panic!("{n}")).kind.clone();
    assert_eq!(kind("va"), LinkKind::Veth);
    assert_eq!(kind("mv0"), LinkKind::Macvlan);
    assert_eq!(kind("br0"), LinkKind::Bridge);
    assert_eq!(kind("tp0"), LinkKind::Tap);
    assert_eq!(kind("tn0"), LinkKind::Tun);
    assert_eq!(kind("vx0"), LinkKind::Other("vxlan".into()));
    assert_eq!(
        info.link("vb").unwrap().master,
        Some(info.link("br0").unwrap().index)
    );
    let mut eps: Vec<&str> = info.endpoints().map(|l| l.name.as_str()).collect();
    eps.sort();
    // Not lo, the bridge, its port vb, or the L3 tun.
    assert_eq!(eps, ["mv0", "tp0", "va", "vx0"]);
}

#[tokio::test]
async fn refuses_paths_that_are_not_network_namespaces() {
    let missing = Path::new("/run/netns/capsule-no-such-namespace");
    let e = discover(missing, T).await.unwrap_err();
    assert!(matches!(e, NetworkError::NetnsMissing { .. }), "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");

    for (path, why) in [
        ("/etc/hostname", "not a namespace file"),
        ("/tmp", "directory"),
        ("/proc/self/ns/ipc", "type is ipc"),
        ("/dev/null", "not a regular file"),
    ] {
        let e = discover(Path::new(path), T).await.unwrap_err();
        assert!(matches!(e, NetworkError::NotNetns { .. }), "{path}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(path) && msg.contains(why), "{path}: {msg}");
    }

    // /proc/<pid>/ns/net of a live process is a network namespace.
    let me = discover(Path::new("/proc/self/ns/net"), T).await.unwrap();
    assert!(me.link("lo").is_some());

    // A namespace with nothing but lo has no endpoint to plumb.
    let empty = TestNs::new(common::NS, "empty");
    let e = endpoints(&empty.path, T).await.unwrap_err();
    assert!(matches!(e, NetworkError::NoEndpoint { .. }), "{e}");
    assert!(e.to_string().contains("no L2 link besides lo"), "{e}");
    let e = plumb(&empty.path, "lo", &PlumbOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, NetworkError::NotL2 { .. }), "{e}");
    let e = plumb(&empty.path, "eth9", &PlumbOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, NetworkError::LinkNotFound { .. }), "{e}");
    assert!(
        e.to_string().contains("eth9") && e.to_string().contains(&empty.name),
        "{e}"
    );
}

#[tokio::test]
async fn refuses_a_link_whose_mtu_the_tap_cannot_take() {
    // A veth takes up to 65535; a tap only 65521 (65535 - Ethernet header).
    let net = PodNet::new(65535);
    let e = plumb(&net.pod.path, "eth0", &PlumbOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, NetworkError::MtuOutOfRange { .. }), "{e}");
    assert!(e.to_string().contains("MTU 65535"), "{e}");
    assert!(!net.pod.has_link("cap_eth0"));
    assert!(!net
        .pod
        .tc(&["qdisc", "show", "dev", "eth0"])
        .contains("ingress"));
}

#[test]
fn refuses_mtus_virtio_net_cannot_take() {
    // Below 68 no link type of this kernel goes, so the bounds are also
    // checked on their own.
    let mut l = LinkInfo {
        index: 2,
        name: "eth0".into(),
        kind: LinkKind::Veth,
        mac: Some("02:00:00:00:00:01".parse().unwrap()),
        mtu: 1500,
        oper_state: OperState::Up,
        up: true,
        master: None,
        alias: None,
        addresses: vec![],
    };
    assert!(check_link("ns", &l).is_ok());
    for (mtu, ok) in [
        (67, false),
        (68, true),
        (65521, true),
        (65522, false),
        (9000, true),
    ] {
        l.mtu = mtu;
        match check_link("ns", &l) {
            Ok(_) => assert!(ok, "MTU {mtu} accepted"),
            Err(e) => {
                assert!(!ok, "MTU {mtu} refused: {e}");
                assert!(matches!(e, NetworkError::MtuOutOfRange { .. }));
                assert!(e.to_string().contains(&format!("MTU {mtu}")), "{e}");
            }
        }
    }
    l.mtu = 1500;
    l.mac = None;
    assert!(matches!(
        check_link("ns", &l),
        Err(NetworkError::NotL2 { .. })
    ));
    let e = plan(
        Path::new("/run/netns/x"),
        &LinkInfo {
            mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
            ..l.clone()
        },
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("queues"), "{e}");
}

#[tokio::test]
async fn work_in_a_namespace_has_a_deadline_and_names_it() {
    let ns = TestNs::new(common::NS, "deadline");
    let n = ns.open();
    let e = n
        .run("a slow thing", Duration::from_millis(100), || {
            std::thread::sleep(Duration::from_millis(500));
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(matches!(e, NetworkError::Timeout { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&ns.name) && msg.contains("a slow thing"),
        "{msg}"
    );
    // The caller's thread never changes namespace; the work's thread did.
    let here = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let there = n
        .run("read own netns", T, || {
            std::fs::read_link("/proc/thread-self/ns/net")
        })
        .await
        .unwrap();
    assert_ne!(here, there);
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        here
    );
}
