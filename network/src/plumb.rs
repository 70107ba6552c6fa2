//! Plumbing a pod link to the VM (Kata's tcfilter model) and taking it
//! down again.
//!
//! [`plumb`] makes a tap beside the link in the same namespace and
//! redirects every frame both ways with tc, then hands back the tap's
//! queue descriptors for QEMU. The tap is **not persistent**: it lives as
//! long as someone (the shim, then QEMU) holds a queue, so a crash of both
//! takes it, its qdisc and its filter away. What does not go away by
//! itself is the link's ingress qdisc and capsule's filter on it:
//! [`unplumb`] removes them from an [`EndpointRecord`], which the caller
//! persists.
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkMessage,
};
use rtnetlink::LinkUnspec;
use serde::{Deserialize, Serialize};

use crate::discover::{find_link, link_not_found, parse_link};
use crate::error::{NetworkError, Result};
use crate::netns::{Netns, NetnsId};
use crate::nl::Nl;
use crate::tap::{open_queues, tap_name, MAX_QUEUES};
use crate::tc;
use crate::types::{LinkInfo, LinkKind, MacAddr};

/// The alias of every tap capsule makes starts with this (then the link).
pub const TAP_ALIAS_PREFIX: &str = "capsule-network tap for ";
/// The MTU range a link must have: 68 is the minimum of the guest's
/// virtio-net driver (ETH_MIN_MTU); QEMU's `host_mtu` is 16 bits, but the
/// tap caps its MTU at 65535 minus its 14-byte Ethernet header.
pub const MIN_MTU: u32 = 68;
pub const MAX_MTU: u32 = 65535 - 14;
/// The default deadline of each netlink request and namespace operation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What capsule made for one link: enough to take it down after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// The namespace path as given to [`plumb`].
    pub netns: PathBuf,
    /// The namespace's identity when plumbed: teardown leaves a path that
    /// now names another namespace alone. `None` in hand-written records.
    #[serde(default)]
    pub netns_id: Option<NetnsId>,
    /// The pod's link (veth...) and its index when plumbed.
    pub link: String,
    pub link_index: u32,
    /// The tap capsule made ([`crate::tap_name`] of the link).
    pub tap: String,
    /// The link's MAC: the VM's virtio-net device takes it.
    pub mac: MacAddr,
    pub mtu: u32,
    pub queues: u32,
    /// The link had no ingress qdisc and capsule added one. Teardown
    /// removes it only then, and only when no one else's filter is left
    /// on it.
    pub link_qdisc_created: bool,
}

/// Options of [`plumb`].
#[derive(Debug, Clone)]
pub struct PlumbOptions {
    /// Tap queues (= virtio-net queue pairs); more than 1 makes a
    /// multiqueue tap. 1..=256.
    pub queues: u32,
    /// Deadline of each netlink request and namespace operation.
    pub timeout: Duration,
}

impl Default for PlumbOptions {
    fn default() -> Self {
        Self {
            queues: 1,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A plumbed link: the record to persist, the link as found, and one
/// descriptor per tap queue (opened inside the namespace) for QEMU.
/// Dropping the descriptors before QEMU holds them removes the tap.
#[derive(Debug)]
pub struct Plumbed {
    pub record: EndpointRecord,
    pub link: LinkInfo,
    pub queues: Vec<OwnedFd>,
}

/// What [`unplumb`] did, object by object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnplumbReport {
    /// The namespace is gone (or the path names another one now):
    /// nothing capsule made can be left in it.
    pub netns_gone: bool,
    pub removed: Vec<String>,
    pub already_gone: Vec<String>,
    /// Things found but not capsule's, so not touched (with why).
    pub left_alone: Vec<String>,
}

/// Checks `link` can be plumbed; `netns` is its namespace's name (for
/// errors).
pub fn check_link(netns: &str, link: &LinkInfo) -> Result<MacAddr> {
    let not_l2 = |why: &str| NetworkError::NotL2 {
        netns: netns.to_string(),
        link: link.name.clone(),
        kind: link.kind.to_string(),
        why: why.to_string(),
    };
    if link.is_capsule_tap() {
        return Err(not_l2("it is a tap capsule made"));
    }
    if matches!(
        link.kind,
        LinkKind::Loopback | LinkKind::Tun | LinkKind::Bridge
    ) {
        return Err(not_l2("it does not carry Ethernet frames of one endpoint"));
    }
    if link.master.is_some() {
        return Err(not_l2("it is enslaved to a bridge or bond"));
    }
    let mac = link.mac.ok_or_else(|| not_l2("it has no MAC address"))?;
    if !(MIN_MTU..=MAX_MTU).contains(&link.mtu) {
        return Err(NetworkError::MtuOutOfRange {
            netns: netns.to_string(),
            link: link.name.clone(),
            mtu: link.mtu,
            min: MIN_MTU,
            max: MAX_MTU,
        });
    }
    Ok(mac)
}

fn check_queues(queues: u32) -> Result<()> {
    if !(1..=MAX_QUEUES).contains(&queues) {
        return Err(NetworkError::Invalid(format!(
            "{queues} tap queues: must be 1..={MAX_QUEUES}"
        )));
    }
    Ok(())
}

/// The record [`plumb`] will produce for `link` of the namespace at
/// `netns`, before anything is made: a caller may persist it first, so a
/// crash in the middle of [`plumb`] is still cleaned up by [`unplumb`].
pub fn plan(netns: &Path, link: &LinkInfo, queues: u32) -> Result<EndpointRecord> {
    check_queues(queues)?;
    let mac = check_link(&netns.display().to_string(), link)?;
    Ok(EndpointRecord {
        netns: netns.to_path_buf(),
        netns_id: None,
        link: link.name.clone(),
        link_index: link.index,
        tap: tap_name(&link.name),
        mac,
        mtu: link.mtu,
        queues,
        // Assumed until plumb knows: teardown also requires the qdisc to
        // hold no one else's filter.
        link_qdisc_created: true,
    })
}

/// The links of the namespace at `netns` that can be plumbed; refuses a
/// namespace with none (only lo, say).
pub async fn endpoints(netns: &Path, timeout: Duration) -> Result<Vec<LinkInfo>> {
    let info = crate::discover(netns, timeout).await?;
    let eps: Vec<LinkInfo> = info.endpoints().cloned().collect();
    if eps.is_empty() {
        return Err(NetworkError::NoEndpoint {
            netns: netns.display().to_string(),
            links: info
                .links
                .iter()
                .map(|l| format!("{} ({})", l.name, l.kind))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(eps)
}

/// Plumbs `link` of the namespace at `netns` to a new tap (see the module
/// docs). On error, whatever was made is removed again.
pub async fn plumb(netns: &Path, link: &str, opts: &PlumbOptions) -> Result<Plumbed> {
    check_queues(opts.queues)?;
    let ns = Netns::open(netns)?;
    let nl = Nl::connect(&ns, opts.timeout).await?;
    let found = find_link(&nl, link)
        .await?
        .ok_or_else(|| link_not_found(&nl, link))?;
    let mut record = plan(netns, &found, opts.queues)?;
    record.netns_id = Some(ns.id());
    record.link_qdisc_created = false;
    if let Some(other) = find_link(&nl, &record.tap).await? {
        return Err(NetworkError::Conflict {
            netns: ns.name(),
            what: format!(
                "link {:?}: its tap name {:?} is taken by a {} link (index {}); \
                 an earlier plumb whose tap is still held open, or not capsule's",
                link, record.tap, other.kind, other.index
            ),
        });
    }
    let tap = record.tap.clone();
    let queues = opts.queues;
    let fds = ns
        .run(
            &format!("link {link:?}: create tap {tap:?}"),
            opts.timeout,
            move || open_queues(&tap, queues),
        )
        .await?;
    match connect_tap(&nl, &mut record).await {
        Ok(()) => Ok(Plumbed {
            record,
            link: found,
            queues: fds,
        }),
        Err(e) => {
            // The tap goes with its last queue; the link's side is undone
            // from the record.
            drop(fds);
            if let Err(ue) = teardown(&nl, &record).await {
                tracing::warn!(netns = %ns.name(), link, error = %ue, "undoing a failed plumb");
            }
            Err(e)
        }
    }
}

/// Sets the new tap up and adds the qdiscs and both redirect filters.
async fn connect_tap(nl: &Nl, record: &mut EndpointRecord) -> Result<()> {
    let what_tap = format!("tap {:?}", record.tap);
    let what_link = format!("link {:?}", record.link);
    let tap = find_link(nl, &record.tap)
        .await?
        .ok_or_else(|| link_not_found(nl, &record.tap))?;
    let base = LinkUnspec::new_with_index(tap.index)
        .mtu(record.mtu)
        .alias(format!("{TAP_ALIAS_PREFIX}{}", record.link));
    // No IPv6 link-local address on the tap: the host must not talk on
    // the guest's wire (DAD, router solicitations).
    let with_af = base.build();
    let mut no_v6 = with_af.clone();
    no_v6
        .attributes
        .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
            vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
        )]));
    let op = format!("{what_tap}: set MTU {} and alias", record.mtu);
    if let Err(e) = nl.call(&op, nl.handle.link().set(no_v6).execute()).await {
        // A kernel without IPv6 refuses the inet6 part.
        tracing::debug!(error = %e, "retrying without addr_gen_mode");
        nl.call(&op, nl.handle.link().set(with_af).execute())
            .await?;
    }
    nl.call(
        format!("{what_tap}: set up"),
        nl.handle
            .link()
            .set(LinkUnspec::new_with_index(tap.index).up().build())
            .execute(),
    )
    .await?;

    // Leftovers of a plumb whose record was lost (the tap is gone, so
    // they redirect nowhere): capsule's by their cookie.
    for f in tc::ingress_filters(nl, record.link_index, &what_link).await? {
        if f.capsule && f.priority == tc::FILTER_PRIORITY {
            tracing::warn!(netns = nl.netns(), link = %record.link, "removing a stale capsule filter");
            tc::del_filters(nl, record.link_index, f.priority, &what_link).await?;
        } else if f.priority == tc::FILTER_PRIORITY {
            return Err(NetworkError::Conflict {
                netns: nl.netns().to_string(),
                what: format!(
                    "{what_link}: an ingress filter that is not capsule's uses priority {}",
                    tc::FILTER_PRIORITY
                ),
            });
        }
    }
    record.link_qdisc_created = tc::add_ingress_qdisc(nl, record.link_index, &what_link).await?;
    tc::add_ingress_qdisc(nl, tap.index, &what_tap).await?;
    tc::add_redirect(nl, record.link_index, tap.index, &what_link).await?;
    tc::add_redirect(nl, tap.index, record.link_index, &what_tap).await?;
    Ok(())
}

/// Takes down what [`plumb`] made for `record`: capsule's filter on the
/// link, the link's ingress qdisc when capsule added it and nothing else
/// uses it, and the tap (with its qdisc and filter). Idempotent: a missing
/// namespace, link, tap, qdisc or filter is reported as already gone.
/// Never touches what is not capsule's (a tap without capsule's alias, a
/// filter without capsule's cookie).
pub async fn unplumb(record: &EndpointRecord, timeout: Duration) -> Result<UnplumbReport> {
    let gone = || UnplumbReport {
        netns_gone: true,
        ..Default::default()
    };
    let ns = match Netns::open(&record.netns) {
        Ok(ns) => ns,
        Err(NetworkError::NetnsMissing { .. }) | Err(NetworkError::NotNetns { .. }) => {
            return Ok(gone())
        }
        Err(e) => return Err(e),
    };
    if record.netns_id.is_some_and(|id| id != ns.id()) {
        tracing::info!(netns = %ns.name(), "the path names another namespace now; nothing to undo");
        return Ok(gone());
    }
    let nl = Nl::connect(&ns, timeout).await?;
    teardown(&nl, record).await
}

async fn teardown(nl: &Nl, record: &EndpointRecord) -> Result<UnplumbReport> {
    let mut rep = UnplumbReport::default();
    let links: Vec<LinkInfo> = nl.links().await?.iter().filter_map(parse_link).collect();
    let what_tap = format!("tap {:?}", record.tap);
    let what_link = format!("link {:?}", record.link);
    let alias = format!("{TAP_ALIAS_PREFIX}{}", record.link);

    match links.iter().find(|l| l.name == record.tap) {
        None => rep.already_gone.push(what_tap.clone()),
        Some(t) if t.kind == LinkKind::Tap && t.alias.as_deref() == Some(alias.as_str()) => {
            let mut m = LinkMessage::default();
            m.header.index = t.index;
            match nl
                .try_call(
                    format!("{what_tap}: delete"),
                    nl.handle.link().del_with_message(m).execute(),
                )
                .await?
            {
                Ok(()) => rep.removed.push(what_tap.clone()),
                Err(e) if crate::nl::errno(&e) == Some(libc::ENODEV) => {
                    rep.already_gone.push(what_tap.clone())
                }
                Err(e) => return Err(nl.error(format!("{what_tap}: delete"), e)),
            }
        }
        Some(t) => rep.left_alone.push(format!(
            "{what_tap}: a {} link whose alias is {:?}, not capsule's",
            t.kind, t.alias
        )),
    }

    let Some(link) = links.iter().find(|l| l.name == record.link) else {
        rep.already_gone.push(what_link);
        return Ok(rep);
    };
    let filters = tc::ingress_filters(nl, link.index, &what_link).await?;
    let ours_at_prio = filters
        .iter()
        .filter(|f| f.priority == tc::FILTER_PRIORITY)
        .all(|f| f.capsule);
    let has_ours = filters.iter().any(|f| f.capsule);
    let what_filter = format!("{what_link}: capsule's redirect filter");
    if !has_ours {
        rep.already_gone.push(what_filter);
    } else if !ours_at_prio {
        rep.left_alone.push(format!(
            "{what_filter}: shares priority {} with a filter that is not capsule's",
            tc::FILTER_PRIORITY
        ));
    } else if tc::del_filters(nl, link.index, tc::FILTER_PRIORITY, &what_link).await? {
        rep.removed.push(what_filter);
    } else {
        rep.already_gone.push(what_filter);
    }

    let what_qdisc = format!("{what_link}: ingress qdisc");
    match tc::ingress_qdisc(nl, link.index, &what_link).await? {
        None => rep.already_gone.push(what_qdisc),
        Some(kind) if kind != "ingress" || !record.link_qdisc_created => rep
            .left_alone
            .push(format!("{what_qdisc}: a {kind} qdisc capsule did not add")),
        Some(_) => {
            let others = tc::ingress_filters(nl, link.index, &what_link).await?;
            if others.is_empty() {
                if tc::del_ingress_qdisc(nl, link.index, &what_link).await? {
                    rep.removed.push(what_qdisc);
                } else {
                    rep.already_gone.push(what_qdisc);
                }
            } else {
                rep.left_alone.push(format!(
                    "{what_qdisc}: still holds {} filter(s) that are not capsule's",
                    others.len()
                ));
            }
        }
    }
    Ok(rep)
}
