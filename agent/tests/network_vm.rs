//! Pod networking end to end in a real guest (root, TCG): a test pod
//! namespace's veth is plumbed to a tap (capsule-network), the tap's queues
//! are hot-plugged into the VM as a virtio-net device with the veth's MAC,
//! SetupNetwork (built from discovery) configures the guest, and the guest
//! answers from the pod's "host side" namespace: ICMP and ICMPv6 echo, TCP
//! into a container, TCP out of it through the default route. Teardown
//! leaves the pod namespace as it was.
//!
//! The test holds `vm_lock()` (a std mutex, on purpose across awaits).
#![allow(clippy::await_holding_lock)]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use capsule_network::{discover, plumb, unplumb, PlumbOptions};
use support::net::{hotplug_nic, ping, setup_request, tcp_accept_one, tcp_read, PodNet};
use support::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_is_reachable_through_the_plumbed_veth() {
    let _l = vm_lock();
    let net = PodNet::new(1450);
    let info = discover(&net.pod.path, T).await.expect("discover");
    let mut req = setup_request(&info, "eth0");
    let queues = 2;
    let p = plumb(&net.pod.path, "eth0", &PlumbOptions { queues, timeout: T })
        .await
        .expect("plumb");
    let record = p.record.clone();

    let vm = Vm::boot(VmOptions::default()).await;
    let conn = vm.connect().await;
    let d = conn
        .guest_details(&Default::default())
        .await
        .expect("details");
    assert!(
        d.features.iter().any(|f| f == "network"),
        "{:?}",
        d.features
    );
    create_sandbox(&conn, "netpod").await.expect("sandbox");

    // Hot-plugged after boot: SetupNetwork waits for the device to show.
    hotplug_nic(&vm, p, "capnic0").await;
    req.timeout_ms = 60_000;
    conn.setup_network(&req)
        .await
        .unwrap_or_else(|e| panic!("SetupNetwork: {e}\n--- console ---\n{}", vm.console()));
    // Idempotent.
    conn.setup_network(&req).await.expect("SetupNetwork again");

    // The guest's view, from a container (it shares the VM's network).
    vm.busybox_container(&conn, "c1", &["sleep", "600"], false)
        .await;
    let (st, out, err) = run(
        &conn,
        "c1",
        "ip1",
        &["/bin/busybox", "ip", "-o", "addr", "show", "dev", "eth0"],
    )
    .await;
    assert_eq!(st, 0, "{err}");
    assert!(
        out.contains("10.210.0.2/24") && out.contains("fd00:210::2/64"),
        "{out}"
    );
    let (_, link, _) = run(
        &conn,
        "c1",
        "ip2",
        &["/bin/busybox", "ip", "-o", "link", "show", "dev", "eth0"],
    )
    .await;
    assert!(
        link.contains("mtu 1450") && link.contains(support::net::POD_MAC),
        "{link}"
    );
    let (_, routes, _) = run(&conn, "c1", "ip3", &["/bin/busybox", "ip", "route"]).await;
    assert!(
        routes.contains("default via 10.210.0.1 dev eth0"),
        "{routes}"
    );
    let (_, neigh, _) = run(&conn, "c1", "ip4", &["/bin/busybox", "ip", "neigh"]).await;
    assert!(
        neigh.contains("10.210.0.1") && neigh.contains("PERMANENT"),
        "{neigh}"
    );

    // From the host side of the pod's veth.
    let peer = net.peer.open();
    assert!(
        ping(
            &peer,
            "10.210.0.2".parse().unwrap(),
            Duration::from_secs(20)
        ),
        "no ICMP echo reply from the guest\n--- console ---\n{}",
        vm.console()
    );
    assert!(
        ping(
            &peer,
            "fd00:210::2".parse().unwrap(),
            Duration::from_secs(20)
        ),
        "no ICMPv6 echo reply from the guest"
    );

    // TCP into a container of the guest...
    exec(
        &conn,
        "c1",
        "srv",
        &[
            "/bin/sh",
            "-c",
            "echo capsule-net-ok | /bin/busybox nc -l -p 7777",
        ],
        false,
        false,
    )
    .await
    .expect("exec nc -l");
    let got = tcp_read(
        &peer,
        SocketAddr::new("10.210.0.2".parse().unwrap(), 7777),
        Duration::from_secs(30),
    );
    assert_eq!(got.trim(), "capsule-net-ok");
    assert_eq!(wait(&conn, "c1", "srv").await, 0);

    // ...and out of it through the default route (10.211.0.1 is only on
    // the peer's lo).
    let accept = tcp_accept_one(
        &peer,
        SocketAddr::new("10.211.0.1".parse().unwrap(), 7778),
        Duration::from_secs(30),
    );
    let (st, _, err) = run(
        &conn,
        "c1",
        "cli",
        &[
            "/bin/sh",
            "-c",
            "echo from-guest | /bin/busybox nc -w 10 10.211.0.1 7778",
        ],
    )
    .await;
    assert_eq!(st, 0, "{err}");
    assert_eq!(accept.join().expect("accept thread").trim(), "from-guest");

    remove(&conn, "c1").await.expect("remove");
    vm.shutdown().await;
    // QEMU is gone, so is the tap; the record cleans the rest.
    let rep = unplumb(&record, T).await.expect("unplumb");
    assert!(rep.left_alone.is_empty(), "{rep:?}");
    assert!(
        rep.already_gone.iter().any(|s| s.contains("cap_eth0")),
        "{rep:?}"
    );
    let after = discover(&net.pod.path, T).await.expect("discover");
    assert!(after.link("cap_eth0").is_none());
    let (before, now) = (
        info.link("eth0").unwrap(),
        after.link("eth0").expect("eth0"),
    );
    assert_eq!(
        (now.index, now.mac, now.mtu),
        (before.index, before.mac, before.mtu)
    );
    let q =
        capsule_network::testutil::sh("tc", &["-n", &net.pod.name, "qdisc", "show", "dev", "eth0"]);
    assert!(!q.contains("ingress"), "{q}");
}
