//! The agent's SetupNetwork against a real kernel without a VM (root): the
//! agent runs on a thread inside a fresh network namespace, where a veth
//! stands in for the virtio-net device. What `ip` shows afterwards is what
//! the request asked for. (tests/network_vm.rs does it in a real guest.)
use std::os::fd::AsFd;
use std::time::Duration;

use capsule_agent::network::Network;
use capsule_agent_protocol::agent::{Interface, IpFamily, Neighbour, Route, SetupNetworkRequest};
use capsule_network::testutil::{sh, TestNs};

/// Runs SetupNetwork as the agent would, but inside `ns` (its own thread
/// and runtime, so the test's threads never change namespace).
fn setup_in(ns: &TestNs, req: SetupNetworkRequest) -> Result<(), String> {
    let f = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(Network::new().setup(&req))
            .map_err(|e| format!("{:?}: {e}", e.code()))
    })
    .join()
    .unwrap()
}

const MAC: &str = "02:00:0a:c8:00:02";
const GW_MAC: &str = "02:00:0a:c8:00:01";

fn request() -> SetupNetworkRequest {
    let mut i = Interface::new();
    i.name = "eth0".into();
    i.mac = MAC.into();
    i.mtu = 1400;
    i.addresses = vec!["10.200.0.2/24".into(), "fd00:200::2/64".into()];
    let route = |dst: &str, gw: &str, fam: IpFamily| {
        let mut r = Route::new();
        r.destination = dst.into();
        r.gateway = gw.into();
        r.device = "eth0".into();
        r.family = fam.into();
        r
    };
    let mut req = SetupNetworkRequest::new();
    req.interfaces.push(i);
    // The shim's order does not matter: the default route comes last.
    req.routes
        .push(route("", "10.200.0.1", IpFamily::IP_FAMILY_V4));
    req.routes
        .push(route("", "fd00:200::1", IpFamily::IP_FAMILY_V6));
    req.routes.push(route(
        "10.201.0.0/16",
        "10.200.0.1",
        IpFamily::IP_FAMILY_UNSPECIFIED,
    ));
    let mut link = route("192.0.2.1/32", "", IpFamily::IP_FAMILY_V4);
    link.scope = 253;
    req.routes.push(link);
    for ip in ["10.200.0.1", "fd00:200::1"] {
        let mut n = Neighbour::new();
        n.ip = ip.into();
        n.mac = GW_MAC.into();
        n.device = "eth0".into();
        req.neighbours.push(n);
    }
    req.timeout_ms = 10_000;
    req
}

fn assert_configured(ns: &TestNs) {
    let link = ns.ip(&["-o", "link", "show", "dev", "eth0"]);
    assert!(link.contains("mtu 1400") && link.contains(MAC), "{link}");
    assert!(link.contains(",UP"), "{link}");
    let a = ns.ip(&["-o", "addr", "show", "dev", "eth0"]);
    assert!(
        a.contains("10.200.0.2/24") && a.contains("fd00:200::2/64"),
        "{a}"
    );
    assert!(!a.contains("10.99.0.9"), "a stale address stayed: {a}");
    let r4 = ns.ip(&["route", "show"]);
    for want in [
        "default via 10.200.0.1 dev eth0",
        "10.201.0.0/16 via 10.200.0.1 dev eth0",
        "192.0.2.1 dev eth0",
        "10.200.0.0/24 dev eth0",
    ] {
        assert!(r4.contains(want), "no {want:?} in\n{r4}");
    }
    let r6 = ns.ip(&["-6", "route", "show"]);
    assert!(r6.contains("default via fd00:200::1 dev eth0"), "{r6}");
    let n = ns.ip(&["neigh", "show", "dev", "eth0"]);
    assert!(
        n.contains(&format!("10.200.0.1 lladdr {GW_MAC} PERMANENT")),
        "{n}"
    );
    let n6 = ns.ip(&["-6", "neigh", "show", "dev", "eth0"]);
    assert!(
        n6.contains(&format!("fd00:200::1 lladdr {GW_MAC} PERMANENT")),
        "{n6}"
    );
}

#[test]
fn configures_interface_found_by_mac_and_is_idempotent() {
    let ns = TestNs::new("capagent", "setup");
    // The "virtio-net device": named as the guest kernel would, with a
    // stale address the request does not list.
    ns.ip(&[
        "link", "add", "enp0s31", "address", MAC, "type", "veth", "peer", "name", "other0",
    ]);
    ns.ip(&["addr", "add", "10.99.0.9/24", "dev", "enp0s31"]);
    setup_in(&ns, request()).unwrap();
    assert_configured(&ns);
    assert!(!ns.ip(&["link", "show"]).contains("enp0s31"));
    // Again: same result, no error.
    setup_in(&ns, request()).unwrap();
    assert_configured(&ns);
}

#[test]
fn waits_for_an_interface_that_appears_later() {
    let ns = TestNs::new("capagent", "setup");
    let name = ns.name.clone();
    let plug = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        sh(
            "ip",
            &[
                "-n", &name, "link", "add", "eth7", "address", MAC, "type", "veth", "peer", "name",
                "other0",
            ],
        );
    });
    let t = std::time::Instant::now();
    setup_in(&ns, request()).unwrap();
    plug.join().unwrap();
    assert!(t.elapsed() >= Duration::from_millis(700));
    assert_configured(&ns);
}

#[test]
fn swaps_names_and_refuses_what_it_cannot_do() {
    let ns = TestNs::new("capagent", "setup");
    // The guest named them the other way round.
    ns.ip(&[
        "link",
        "add",
        "eth0",
        "address",
        "02:00:00:00:00:11",
        "type",
        "veth",
        "peer",
        "name",
        "p1",
    ]);
    ns.ip(&[
        "link",
        "add",
        "eth1",
        "address",
        "02:00:00:00:00:10",
        "type",
        "veth",
        "peer",
        "name",
        "p2",
    ]);
    let mut req = SetupNetworkRequest::new();
    for (name, mac) in [("eth0", "02:00:00:00:00:10"), ("eth1", "02:00:00:00:00:11")] {
        let mut i = Interface::new();
        i.name = name.into();
        i.mac = mac.into();
        req.interfaces.push(i);
    }
    setup_in(&ns, req.clone()).unwrap();
    let l = ns.ip(&["-o", "link", "show", "dev", "eth0"]);
    assert!(l.contains("02:00:00:00:00:10"), "{l}");

    // A name held by a link outside the request.
    let mut r2 = SetupNetworkRequest::new();
    let mut i = Interface::new();
    i.name = "p1".into();
    i.mac = "02:00:00:00:00:10".into();
    r2.interfaces.push(i);
    let e = setup_in(&ns, r2).unwrap_err();
    assert!(
        e.contains("FAILED_PRECONDITION") && e.contains("not in the request"),
        "{e}"
    );

    // A MAC that never shows up: a deadline error naming it.
    let mut r3 = SetupNetworkRequest::new();
    let mut i = Interface::new();
    i.name = "eth5".into();
    i.mac = "02:00:00:00:00:99".into();
    r3.interfaces.push(i);
    r3.timeout_ms = 300;
    let e = setup_in(&ns, r3).unwrap_err();
    assert!(
        e.contains("DEADLINE_EXCEEDED") && e.contains("02:00:00:00:00:99"),
        "{e}"
    );
}
