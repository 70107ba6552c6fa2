//! Plumbing against real namespaces (root): frames written into the tap
//! queues come out of the pod's veth peer and the reverse; teardown leaves
//! nothing capsule made and nothing else touched, also after a "crash"
//! (descriptors dropped without unplumb).
mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use capsule_network::*;
use common::*;

const T: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(5);

fn opts(queues: u32) -> PlumbOptions {
    PlumbOptions { queues, timeout: T }
}

/// Frames both ways between the tap queues and the peer.
fn check_traffic(net: &PodNet, p: &Plumbed) {
    let peer = packet_socket(&net.peer.open(), "peer0");
    // VM -> pod network: the guest writes into a queue (with its
    // virtio-net header); the frame leaves through eth0 to the peer.
    for (q, fd) in p.queues.iter().enumerate() {
        let tok = token(&format!("out-q{q}"));
        let mut buf = vec![0u8; VNET_HDR_LEN];
        buf.extend(frame(net.peer_mac, net.pod_mac, &tok));
        write_all(fd.as_fd(), &buf);
        let got = wait_frame(&[peer.as_fd()], 0, &tok, WAIT)
            .unwrap_or_else(|| panic!("frame written to tap queue {q} never reached the peer"));
        assert_eq!(&got[0..6], &net.peer_mac.0);
        assert_eq!(&got[6..12], &net.pod_mac.0);
    }
    // Pod network -> VM: the peer sends to eth0's MAC; it comes out of one
    // of the tap queues, after the virtio-net header.
    for i in 0..4 {
        let tok = token(&format!("in-{i}"));
        write_all(peer.as_fd(), &frame(net.pod_mac, net.peer_mac, &tok));
        let got = wait_frame(&borrow(&p.queues), VNET_HDR_LEN, &tok, WAIT)
            .unwrap_or_else(|| panic!("frame sent by the peer never came out of the tap"));
        assert_eq!(&got[0..6], &net.pod_mac.0);
    }
}

fn assert_clean(net: &PodNet, tap: &str) {
    let pod = &net.pod;
    assert!(!pod.has_link(tap), "tap {tap} left behind");
    let q = pod.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(!q.contains("ingress"), "ingress qdisc left on eth0: {q}");
    let f = pod.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(f.trim().is_empty(), "filters left on eth0: {f}");
    // The veth and its addresses are intact.
    assert_eq!(pod.mac("eth0"), net.pod_mac);
    assert!(pod
        .ip(&["addr", "show", "dev", "eth0"])
        .contains("10.200.0.2/24"));
    assert!(net.pod.path.exists() && net.peer.path.exists());
}

async fn plumb_traffic_unplumb(queues: u32) {
    let net = PodNet::new(1450);
    let p = plumb(&net.pod.path, "eth0", &opts(queues)).await.unwrap();
    let r = &p.record;
    assert_eq!(r.link, "eth0");
    assert_eq!(r.tap, "cap_eth0");
    assert_eq!(r.mac, net.pod_mac);
    assert_eq!(r.mtu, 1450);
    assert_eq!(r.queues, queues);
    assert!(r.link_qdisc_created);
    assert_eq!(r.netns_id, Some(net.pod.open().id()));
    assert_eq!(p.queues.len(), queues as usize);

    // What the kernel shows: the tap with the link's MTU, up, no IPv6
    // link-local; both qdiscs and filters.
    let info = discover(&net.pod.path, T).await.unwrap();
    let tap = info.link("cap_eth0").expect("tap");
    assert_eq!(tap.kind, LinkKind::Tap);
    assert_eq!(tap.mtu, 1450);
    assert!(tap.up && tap.is_capsule_tap() && !tap.is_l2_endpoint());
    assert!(tap.addresses.is_empty(), "{:?}", tap.addresses);
    let eps: Vec<&str> = info.endpoints().map(|l| l.name.as_str()).collect();
    assert_eq!(eps, ["eth0"], "a capsule tap is not an endpoint");
    let d = net.pod.ip(&["-d", "link", "show", "dev", "cap_eth0"]);
    assert!(d.contains("tap") && d.contains("vnet_hdr"), "{d}");
    assert_eq!(d.contains("multi_queue"), queues > 1, "{d}");
    assert!(
        d.contains("persist off"),
        "the tap must not be persistent: {d}"
    );
    for dev in ["eth0", "cap_eth0"] {
        let q = net.pod.tc(&["qdisc", "show", "dev", dev]);
        assert!(q.contains("qdisc ingress ffff:"), "{dev}: {q}");
    }
    let f = net.pod.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(f.contains("Egress Redirect to device cap_eth0"), "{f}");
    let f = net
        .pod
        .tc(&["filter", "show", "dev", "cap_eth0", "ingress"]);
    assert!(f.contains("Egress Redirect to device eth0"), "{f}");

    check_traffic(&net, &p);

    // Teardown while the queues are still open (as with QEMU running).
    let rep = unplumb(&p.record, T).await.unwrap();
    assert!(!rep.netns_gone);
    assert!(rep.left_alone.is_empty(), "{rep:?}");
    assert_eq!(rep.removed.len(), 3, "tap, filter, qdisc: {rep:?}");
    assert_clean(&net, "cap_eth0");
    drop(p);
    // Again: everything is already gone.
    let rep = unplumb(&r_clone(&net).await, T).await.unwrap();
    assert!(rep.removed.is_empty(), "{rep:?}");
}

/// A record like plumb's, for a second teardown.
async fn r_clone(net: &PodNet) -> EndpointRecord {
    let info = discover(&net.pod.path, T).await.unwrap();
    let mut r = plan(&net.pod.path, info.link("eth0").unwrap(), 1).unwrap();
    r.netns_id = Some(net.pod.open().id());
    r
}

#[tokio::test]
async fn single_queue_tap_carries_frames_both_ways() {
    plumb_traffic_unplumb(1).await;
}

#[tokio::test]
async fn multiqueue_tap_carries_frames_both_ways() {
    plumb_traffic_unplumb(4).await;
}

#[tokio::test]
async fn crash_without_unplumb_is_cleaned_from_the_record() {
    let net = PodNet::new(1500);
    let p = plumb(&net.pod.path, "eth0", &opts(2)).await.unwrap();
    // The device manager persists the record as JSON.
    let saved = serde_json::to_string(&p.record).unwrap();
    // Shim and QEMU die: their descriptors close. The tap goes by itself...
    drop(p);
    assert!(
        !net.pod.has_link("cap_eth0"),
        "a non-persistent tap outlived its queues"
    );
    // ...but the link's ingress qdisc and capsule's filter stay.
    let q = net.pod.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(q.contains("ingress"), "{q}");
    let f = net.pod.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(f.contains("mirred"), "{f}");

    let record: EndpointRecord = serde_json::from_str(&saved).unwrap();
    let rep = unplumb(&record, T).await.unwrap();
    assert_eq!(rep.already_gone, ["tap \"cap_eth0\""], "{rep:?}");
    assert_eq!(rep.removed.len(), 2, "{rep:?}");
    assert_clean(&net, "cap_eth0");

    // Idempotent, and the eth0 <-> peer path works again without the tap.
    let rep = unplumb(&record, T).await.unwrap();
    assert!(
        rep.removed.is_empty() && rep.left_alone.is_empty(),
        "{rep:?}"
    );
    assert_eq!(rep.already_gone.len(), 3, "{rep:?}");
    let eth0 = packet_socket(&net.pod.open(), "eth0");
    let peer = packet_socket(&net.peer.open(), "peer0");
    let tok = token("direct");
    write_all(peer.as_fd(), &frame(net.pod_mac, net.peer_mac, &tok));
    assert!(
        wait_frame(&[eth0.as_fd()], 0, &tok, WAIT).is_some(),
        "eth0 does not get its peer's frames after teardown"
    );

    // A plumb after the crash works (the stale state is gone).
    let p = plumb(&net.pod.path, "eth0", &opts(1)).await.unwrap();
    check_traffic(&net, &p);
    unplumb(&p.record, T).await.unwrap();
    drop(p);
    assert_clean(&net, "cap_eth0");

    // The namespace itself gone: nothing to do, not an error.
    let path = net.pod.path.clone();
    drop(net);
    assert!(!path.exists());
    let rep = unplumb(&record, T).await.unwrap();
    assert!(rep.netns_gone, "{rep:?}");
}

#[tokio::test]
async fn stale_filter_of_a_lost_record_is_replaced() {
    let net = PodNet::new(1500);
    // Plumb, "crash" and lose the record: the next plumb finds capsule's
    // filter (by its cookie) on eth0 and replaces it.
    let p = plumb(&net.pod.path, "eth0", &opts(1)).await.unwrap();
    drop(p);
    let p = plumb(&net.pod.path, "eth0", &opts(1)).await.unwrap();
    // The qdisc was already there (made by the lost plumb).
    assert!(!p.record.link_qdisc_created);
    let f = net.pod.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert_eq!(f.matches("mirred").count(), 1, "{f}");
    check_traffic(&net, &p);
    unplumb(&p.record, T).await.unwrap();
}

#[tokio::test]
async fn never_touches_what_is_not_capsules() {
    let net = PodNet::new(1500);
    let pod = &net.pod;
    // Someone else's ingress qdisc and filter on eth0.
    pod.tc(&["qdisc", "add", "dev", "eth0", "ingress"]);
    pod.tc(&[
        "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "ip", "pref", "100", "u32",
        "match", "u32", "0", "0", "flowid", "1:1",
    ]);
    let p = plumb(&pod.path, "eth0", &opts(1)).await.unwrap();
    assert!(!p.record.link_qdisc_created);
    check_traffic(&net, &p);
    let rep = unplumb(&p.record, T).await.unwrap();
    drop(p);
    assert!(!pod.has_link("cap_eth0"));
    // The foreign qdisc and filter stay.
    assert!(pod
        .tc(&["qdisc", "show", "dev", "eth0"])
        .contains("ingress"));
    let f = pod.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(f.contains("pref 100") && !f.contains("mirred"), "{f}");
    assert!(f.contains("flowid 1:1"), "{f}");
    assert!(
        rep.left_alone.iter().any(|s| s.contains("qdisc")),
        "{rep:?}"
    );

    // A tap of that name that capsule did not make: plumb refuses,
    // unplumb leaves it.
    pod.ip(&["tuntap", "add", "cap_eth0", "mode", "tap"]);
    let e = plumb(&pod.path, "eth0", &opts(1)).await.unwrap_err();
    assert!(matches!(e, NetworkError::Conflict { .. }), "{e}");
    assert!(e.to_string().contains("cap_eth0"), "{e}");
    let mut r = plan(
        &pod.path,
        discover(&pod.path, T).await.unwrap().link("eth0").unwrap(),
        1,
    )
    .unwrap();
    r.link_qdisc_created = true;
    r.netns_id = Some(pod.open().id());
    let rep = unplumb(&r, T).await.unwrap();
    assert!(pod.has_link("cap_eth0"), "a foreign tap was deleted");
    assert!(
        rep.left_alone.iter().any(|s| s.contains("cap_eth0")),
        "{rep:?}"
    );
    // The qdisc still holds a foreign filter: left alone even though the
    // record claims capsule made it.
    assert!(pod
        .tc(&["qdisc", "show", "dev", "eth0"])
        .contains("ingress"));

    // A record whose path now names another namespace: untouched.
    let other = TestNs::new(common::NS, "other");
    let mut r2 = r.clone();
    r2.netns = other.path.clone();
    let rep = unplumb(&r2, T).await.unwrap();
    assert!(rep.netns_gone && rep.removed.is_empty(), "{rep:?}");
}

#[tokio::test]
async fn macvlan_endpoint_is_plumbed_too() {
    let net = PodNet::new(1500);
    let pod = &net.pod;
    // eth0 becomes the macvlan's parent; the endpoint is mv0.
    pod.ip(&["addr", "flush", "dev", "eth0"]);
    pod.ip(&[
        "link",
        "add",
        "mv0",
        "link",
        "eth0",
        "address",
        "02:00:0a:c8:00:05",
        "type",
        "macvlan",
        "mode",
        "bridge",
    ]);
    pod.ip(&["link", "set", "mv0", "up"]);
    let p = plumb(&pod.path, "mv0", &opts(1)).await.unwrap();
    assert_eq!(p.record.tap, "cap_mv0");
    assert_eq!(p.link.kind, LinkKind::Macvlan);
    let peer = packet_socket(&net.peer.open(), "peer0");
    let mv_mac = pod.mac("mv0");
    let tok = token("macvlan-out");
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend(frame(net.peer_mac, mv_mac, &tok));
    write_all(p.queues[0].as_fd(), &buf);
    assert!(wait_frame(&[peer.as_fd()], 0, &tok, WAIT).is_some());
    let tok = token("macvlan-in");
    write_all(peer.as_fd(), &frame(mv_mac, net.peer_mac, &tok));
    assert!(wait_frame(&borrow(&p.queues), VNET_HDR_LEN, &tok, WAIT).is_some());
    let rep = unplumb(&p.record, T).await.unwrap();
    assert!(rep.left_alone.is_empty(), "{rep:?}");
    assert!(!pod.has_link("cap_mv0"));
}
