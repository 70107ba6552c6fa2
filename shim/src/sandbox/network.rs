//! The pod's network, from its network namespace to the guest.
//!
//! The spec names the pod's network namespace (CRI and `ctr run --cni`
//! give its path). Each L2 link CNI made there (a veth, say) becomes an
//! endpoint: recorded in `devices.json` first (owned by the runtime), then
//! plumbed (a tap beside the link, traffic redirected both ways by tc; see
//! `capsule-network`), its tap queues handed to the VM, and plugged as a
//! virtio-net device with the link's MAC and MTU. The guest agent then
//! gives the interface the link's name, addresses, routes and neighbours.
//! After a crash, every recorded endpoint is unplumbed from its record.
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsule_agent_protocol::agent;
use capsule_devmgr::{DeviceKind, DeviceManager, HostDevice, NetEndpoint, Owner};
use capsule_hypervisor::VmSlot;
use capsule_network::{EndpointRecord, Family, LinkInfo, NetnsInfo, PlumbOptions};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::error::{Error, Result};
use crate::fault;

/// Deadline of each netlink request and namespace operation.
pub const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);

/// The network a sandbox gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetwork {
    /// A new network namespace without a path (`ctr run` without
    /// `--cni`): the guest has loopback only.
    Loopback,
    /// The pod's network namespace.
    Netns(PathBuf),
}

/// Reads the pod's network from the spec. A spec without a network
/// namespace shares the host's: refused, a VM cannot share the host's
/// network stack.
pub fn pod_network(spec: &Spec) -> Result<PodNetwork> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    match namespaces
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)
    {
        None => Err(Error::invalid(
            "the spec shares the host's network namespace (host network): a VM sandbox cannot share the host's network stack; give the pod a network namespace of its own",
        )),
        Some(ns) => Ok(match ns.path() {
            None => PodNetwork::Loopback,
            Some(p) => PodNetwork::Netns(p.clone()),
        }),
    }
}

/// A pod network as discovered, with the endpoints to plumb.
#[derive(Debug, Clone)]
pub struct NetworkPlan {
    pub info: NetnsInfo,
    pub endpoints: Vec<NetEndpoint>,
}

impl NetworkPlan {
    /// Refuses a namespace without any link to give the VM (only lo).
    pub fn require_endpoints(&self) -> Result<()> {
        if !self.endpoints.is_empty() {
            return Ok(());
        }
        Err(net_err(capsule_network::NetworkError::NoEndpoint {
            netns: self.info.netns.display().to_string(),
            links: self
                .info
                .links
                .iter()
                .map(|l| format!("{} ({})", l.name, l.kind))
                .collect::<Vec<_>>()
                .join(", "),
        }))
    }
}

/// Makes a network namespace for a sandbox whose spec asked for a new one
/// without a path (`ctr run`): pinned by a bind mount on `path` (inside the
/// sandbox's state directory, so the sandbox's teardown removes it). The
/// VM is started in it, so whoever configures the task's namespace (`ctr
/// run --cni` uses `/proc/<task pid>/ns/net`) configures the pod's.
pub fn create_private_netns(path: &Path) -> Result<()> {
    let target = path.to_path_buf();
    let made = std::thread::spawn(move || -> std::io::Result<()> {
        // This thread only: it ends right after.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join();
    match made {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(crate::error::io(
            format!("making the sandbox's network namespace {}", path.display()),
            e,
        )),
        Err(_) => Err(Error::internal(format!(
            "making the sandbox's network namespace {}: the thread panicked",
            path.display()
        ))),
    }
}

/// Discovers the pod's namespace and plans one endpoint per L2 link, with
/// `queues` tap queues each (none when CNI has not run yet). Refuses a path
/// that is not a network namespace, or a link whose MTU the VM cannot
/// carry, naming it.
pub async fn plan(netns: &Path, queues: u32) -> Result<NetworkPlan> {
    let ns = capsule_network::Netns::open(netns).map_err(net_err)?;
    let id = ns.id();
    let info = capsule_network::discover(netns, NETLINK_TIMEOUT)
        .await
        .map_err(net_err)?;
    let links: Vec<&LinkInfo> = info.endpoints().collect();
    let mut endpoints = Vec::new();
    for l in links {
        let mut rec = capsule_network::plan(netns, l, queues).map_err(net_err)?;
        rec.netns_id = Some(id);
        endpoints.push(to_endpoint(&rec));
    }
    Ok(NetworkPlan { info, endpoints })
}

fn net_err(e: capsule_network::NetworkError) -> Error {
    Error::invalid(e.to_string()).context("pod network")
}

/// The record the device manager keeps, from the plumbing's.
pub fn to_endpoint(r: &EndpointRecord) -> NetEndpoint {
    NetEndpoint {
        netns: r.netns.clone(),
        netns_id: r.netns_id.map(|i| (i.dev, i.inode)),
        link: r.link.clone(),
        link_index: r.link_index,
        tap: r.tap.clone(),
        mac: r.mac.to_string(),
        mtu: r.mtu,
        queues: r.queues,
        link_qdisc_created: r.link_qdisc_created,
    }
}

/// The plumbing's record, from the device manager's.
pub fn to_record(e: &NetEndpoint) -> Result<EndpointRecord> {
    let mac = e
        .mac
        .parse()
        .map_err(|m: String| Error::invalid(format!("endpoint {}: {m}", e.link)))?;
    Ok(EndpointRecord {
        netns: e.netns.clone(),
        netns_id: e
            .netns_id
            .map(|(dev, inode)| capsule_network::NetnsId { dev, inode }),
        link: e.link.clone(),
        link_index: e.link_index,
        tap: e.tap.clone(),
        mac,
        mtu: e.mtu,
        queues: e.queues,
        link_qdisc_created: e.link_qdisc_created,
    })
}

fn purpose(ep: &NetEndpoint) -> String {
    format!("network {}", ep.link)
}

/// Records, plumbs and plugs `endpoints` (cold-plugged into a VM that has
/// not booted when `cold`). On error the endpoints plumbed by this call are
/// unplumbed and forgotten again.
pub async fn attach(
    mgr: &DeviceManager,
    slot: &VmSlot,
    endpoints: &[NetEndpoint],
    cold: bool,
) -> Result<()> {
    let mut done: Vec<NetEndpoint> = Vec::new();
    for ep in endpoints {
        if let Err(e) = attach_one(mgr, slot, ep, cold).await {
            let mut trouble = Vec::new();
            for d in done.iter().rev() {
                if let Err(t) = detach_one(mgr, d).await {
                    trouble.push(t.to_string());
                }
            }
            return Err(if trouble.is_empty() {
                e
            } else {
                e.note(format!(
                    "undoing the endpoints attached before: {}",
                    trouble.join("; ")
                ))
            });
        }
        done.push(ep.clone());
    }
    Ok(())
}

async fn attach_one(
    mgr: &DeviceManager,
    slot: &VmSlot,
    ep: &NetEndpoint,
    cold: bool,
) -> Result<()> {
    let owner = Owner::runtime(purpose(ep));
    // In devices.json before anything exists: a crash from here on is
    // undone from the record.
    let id = mgr.new_device(
        owner.clone(),
        HostDevice {
            info: None,
            host_path: ep.netns.clone(),
            kind: DeviceKind::Network(ep.clone()),
        },
    )?;
    fault::point("net.recorded");
    let forget = |e: Error| async move {
        let mut e = e;
        if let Ok(r) = to_record(ep) {
            if let Err(u) = capsule_network::unplumb(&r, NETLINK_TIMEOUT).await {
                e = e.note(format!("unplumbing {} again: {u}", ep.tap));
            }
        }
        match mgr.remove_use(&id, &owner, None).await {
            Ok(_) => e,
            Err(r) => e.note(format!("forgetting the endpoint: {r}")),
        }
    };
    let opts = PlumbOptions {
        queues: ep.queues,
        timeout: NETLINK_TIMEOUT,
    };
    let plumbed = match capsule_network::plumb(&ep.netns, &ep.link, &opts).await {
        Ok(p) => p,
        Err(e) => return Err(forget(net_err(e)).await),
    };
    fault::point("net.plumbed");
    slot.hand_over_tap(&plumbed.record.tap, plumbed.queues);
    let plugged = if cold {
        mgr.coldplug(&id).await
    } else {
        mgr.attach(&id).await
    };
    match plugged {
        Ok(addr) => {
            tracing::info!(link = %ep.link, tap = %ep.tap, netns = %ep.netns.display(), address = ?addr, "network endpoint attached");
            Ok(())
        }
        Err(e) => Err(forget(Error::from(e).context(format!("plugging {}", purpose(ep)))).await),
    }
}

async fn detach_one(mgr: &DeviceManager, ep: &NetEndpoint) -> Result<()> {
    let owner = Owner::runtime(purpose(ep));
    let Some(rec) = mgr
        .list()
        .into_iter()
        .find(|r| r.uses_of(&owner).next().is_some())
    else {
        return Ok(());
    };
    if rec.is_plugged() {
        mgr.detach(&rec.id).await?;
    }
    mgr.remove_use(&rec.id, &owner, None).await?;
    capsule_network::unplumb(&to_record(ep)?, NETLINK_TIMEOUT)
        .await
        .map_err(net_err)?;
    Ok(())
}

/// What the guest agent is told: per endpoint, the link's name, MAC, MTU
/// and addresses (not link-local ones: the guest makes its own), its
/// routes (the IPv6 link-local prefix excepted) and neighbours.
pub fn setup_request(plan: &NetworkPlan, timeout: Duration) -> agent::SetupNetworkRequest {
    let mut req = agent::SetupNetworkRequest::new();
    req.timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    for ep in &plan.endpoints {
        let Some(l) = plan.info.link(&ep.link) else {
            continue;
        };
        let mut i = agent::Interface::new();
        i.name = l.name.clone();
        i.mac = ep.mac.clone();
        i.mtu = ep.mtu;
        i.addresses = l
            .addresses
            .iter()
            .filter(|a| !a.link_local)
            .map(|a| a.prefix.to_string())
            .collect();
        req.interfaces.push(i);
        for r in plan.info.routes_of(l) {
            let link_local = r.destination.is_some_and(|d| match d.addr {
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
                IpAddr::V4(_) => false,
            });
            if link_local {
                continue;
            }
            let mut m = agent::Route::new();
            m.destination = r.destination.map(|d| d.to_string()).unwrap_or_default();
            m.gateway = r.gateway.map(|g| g.to_string()).unwrap_or_default();
            m.device = l.name.clone();
            m.source = r.source.map(|s| s.to_string()).unwrap_or_default();
            m.scope = r.scope.raw().into();
            m.family = match r.family {
                Family::V4 => agent::IpFamily::IP_FAMILY_V4,
                Family::V6 => agent::IpFamily::IP_FAMILY_V6,
            }
            .into();
            m.metric = r.metric.unwrap_or(0);
            req.routes.push(m);
        }
        for n in plan.info.neighbours_of(l) {
            let mut m = agent::Neighbour::new();
            m.ip = n.ip.to_string();
            m.mac = n.mac.to_string();
            m.device = l.name.clone();
            req.neighbours.push(m);
        }
    }
    req
}

/// Undoes the plumbing of every network endpoint recorded in `devices`
/// (after a crash, or when the sandbox goes). Returns what it did and what
/// failed; never touches what capsule did not make.
pub async fn unplumb_recorded(
    devices: &[capsule_devmgr::DeviceRecord],
) -> (Vec<String>, Vec<String>) {
    let mut did = Vec::new();
    let mut failed = Vec::new();
    for d in devices {
        let DeviceKind::Network(ep) = &d.kind else {
            continue;
        };
        let rec = match to_record(ep) {
            Ok(r) => r,
            Err(e) => {
                failed.push(e.to_string());
                continue;
            }
        };
        match capsule_network::unplumb(&rec, NETLINK_TIMEOUT).await {
            Ok(r) => {
                if !r.removed.is_empty() {
                    did.push(format!(
                        "unplumbed {} of {} in {}: removed {}",
                        ep.tap,
                        ep.link,
                        ep.netns.display(),
                        r.removed.join(", ")
                    ));
                }
                for l in r.left_alone {
                    did.push(format!("left alone in {}: {l}", ep.netns.display()));
                }
            }
            Err(e) => failed.push(format!("unplumbing {} of {}: {e}", ep.tap, ep.link)),
        }
    }
    (did, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(namespaces: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": namespaces}
        }))
        .unwrap()
    }

    #[test]
    fn the_spec_names_the_pod_network() {
        let s = spec(serde_json::json!([{"type": "network", "path": "/run/netns/p1"}]));
        assert_eq!(
            pod_network(&s).unwrap(),
            PodNetwork::Netns("/run/netns/p1".into())
        );
        let s = spec(serde_json::json!([{"type": "network"}, {"type": "pid"}]));
        assert_eq!(pod_network(&s).unwrap(), PodNetwork::Loopback);
        let s = spec(serde_json::json!([{"type": "pid"}]));
        let e = pod_network(&s).unwrap_err();
        assert!(e.to_string().contains("host network"), "{e}");
        assert_eq!(e.kind(), crate::error::Kind::InvalidArgument);
    }

    #[test]
    fn records_convert_both_ways() {
        let ep = NetEndpoint {
            netns: "/run/netns/p1".into(),
            netns_id: Some((4, 4026532000)),
            link: "eth0".into(),
            link_index: 3,
            tap: "cap_eth0".into(),
            mac: "02:42:0a:58:00:05".into(),
            mtu: 1450,
            queues: 2,
            link_qdisc_created: true,
        };
        assert_eq!(to_endpoint(&to_record(&ep).unwrap()), ep);
        let mut bad = ep.clone();
        bad.mac = "zz".into();
        assert!(to_record(&bad).unwrap_err().to_string().contains("eth0"));
    }
}
