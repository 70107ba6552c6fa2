//! Discovery: what a network namespace holds (links with their addresses,
//! main-table routes, ARP/NDP neighbours), read over netlink from inside
//! the namespace.
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkLayerType, LinkMessage, State,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState as NlNeighState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::RouteMessageBuilder;

use crate::error::{NetworkError, Result};
use crate::netns::Netns;
use crate::nl::Nl;
use crate::types::*;

/// Reads the links, addresses, routes and neighbours of the namespace at
/// `netns`; every netlink request has `timeout`.
pub async fn discover(netns: &Path, timeout: Duration) -> Result<NetnsInfo> {
    let ns = Netns::open(netns)?;
    let nl = Nl::connect(&ns, timeout).await?;
    discover_with(&nl, netns).await
}

pub(crate) async fn discover_with(nl: &Nl, netns: &Path) -> Result<NetnsInfo> {
    let mut links: Vec<LinkInfo> = nl.links().await?.iter().filter_map(parse_link).collect();
    links.sort_by_key(|l| l.index);
    let names: HashMap<u32, String> = links.iter().map(|l| (l.index, l.name.clone())).collect();

    let addrs = nl
        .dump("list addresses", nl.handle.address().get().execute())
        .await?;
    for a in &addrs {
        if let Some((index, addr)) = parse_address(a) {
            if let Some(l) = links.iter_mut().find(|l| l.index == index) {
                l.addresses.push(addr);
            }
        }
    }

    let mut routes = Vec::new();
    let v4 = nl
        .dump(
            "list IPv4 routes",
            nl.handle
                .route()
                .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
                .execute(),
        )
        .await?;
    let v6 = nl
        .dump(
            "list IPv6 routes",
            nl.handle
                .route()
                .get(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build())
                .execute(),
        )
        .await?;
    for m in v4.iter().chain(v6.iter()) {
        if let Some(r) = parse_route(m, &names) {
            routes.push(r);
        }
    }

    let neigh = nl
        .dump("list neighbours", nl.handle.neighbours().get().execute())
        .await?;
    let neighbours = neigh
        .iter()
        .filter_map(|n| parse_neighbour(n, &names))
        .collect();

    Ok(NetnsInfo {
        netns: netns.to_path_buf(),
        links,
        routes,
        neighbours,
    })
}

/// The namespace's link named `name`, if there is one.
pub(crate) async fn find_link(nl: &Nl, name: &str) -> Result<Option<LinkInfo>> {
    Ok(nl
        .links()
        .await?
        .iter()
        .filter_map(parse_link)
        .find(|l| l.name == name))
}

pub(crate) fn link_not_found(nl: &Nl, name: &str) -> NetworkError {
    NetworkError::LinkNotFound {
        netns: nl.netns().to_string(),
        link: name.to_string(),
    }
}

fn oper_state(s: &State) -> OperState {
    match s {
        State::NotPresent => OperState::NotPresent,
        State::Down => OperState::Down,
        State::LowerLayerDown => OperState::LowerLayerDown,
        State::Testing => OperState::Testing,
        State::Dormant => OperState::Dormant,
        State::Up => OperState::Up,
        _ => OperState::Unknown,
    }
}

fn kind_of(info: Option<&InfoKind>, layer: LinkLayerType) -> LinkKind {
    match (info, layer) {
        (_, LinkLayerType::Loopback) => LinkKind::Loopback,
        (Some(InfoKind::Veth), _) => LinkKind::Veth,
        (Some(InfoKind::MacVlan), _) => LinkKind::Macvlan,
        (Some(InfoKind::MacVtap), _) => LinkKind::Macvtap,
        (Some(InfoKind::IpVlan), _) => LinkKind::Ipvlan,
        (Some(InfoKind::Vlan), _) => LinkKind::Vlan,
        (Some(InfoKind::Tun), LinkLayerType::Ether) => LinkKind::Tap,
        (Some(InfoKind::Tun), _) => LinkKind::Tun,
        (Some(InfoKind::Bridge), _) => LinkKind::Bridge,
        (Some(InfoKind::Dummy), _) => LinkKind::Dummy,
        (Some(k), _) => LinkKind::Other(k.to_string()),
        (None, LinkLayerType::Ether) => LinkKind::Physical,
        (None, other) => LinkKind::Other(format!("{other:?}").to_lowercase()),
    }
}

pub(crate) fn parse_link(m: &LinkMessage) -> Option<LinkInfo> {
    let mut name = None;
    let mut mac = None;
    let mut mtu = 0;
    let mut oper = OperState::Unknown;
    let mut master = None;
    let mut alias = None;
    let mut kind = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(b) => mac = MacAddr::from_bytes(b),
            LinkAttribute::Mtu(v) => mtu = *v,
            LinkAttribute::OperState(s) => oper = oper_state(s),
            LinkAttribute::Controller(i) => master = Some(*i),
            LinkAttribute::IfAlias(s) => alias = Some(s.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let NlLinkInfo::Kind(k) = i {
                        kind = Some(k.clone());
                    }
                }
            }
            _ => {}
        }
    }
    let kind = kind_of(kind.as_ref(), m.header.link_layer_type);
    // lo reports an all-zero address: no hardware address.
    let mac = mac.filter(|m| m.0 != [0; 6] && kind != LinkKind::Loopback);
    Some(LinkInfo {
        index: m.header.index,
        name: name?,
        kind,
        mac,
        mtu,
        oper_state: oper,
        up: m.header.flags.contains(LinkFlags::Up),
        master,
        alias,
        addresses: Vec::new(),
    })
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

pub(crate) fn parse_address(m: &AddressMessage) -> Option<(u32, Address)> {
    let mut address = None;
    let mut local = None;
    let mut tentative = m.header.flags.contains(AddressHeaderFlags::Tentative);
    for a in &m.attributes {
        match a {
            AddressAttribute::Address(ip) => address = Some(*ip),
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Flags(f) => {
                tentative |= f.contains(rtnetlink::packet_route::address::AddressFlags::Tentative)
            }
            _ => {}
        }
    }
    // IPv4: IFA_LOCAL is the interface's address (IFA_ADDRESS the peer's on
    // point-to-point links); IPv6 only has IFA_ADDRESS.
    let ip = local.or(address)?;
    let prefix = IpPrefix::new(ip, m.header.prefix_len)?;
    Some((
        m.header.index,
        Address {
            prefix,
            scope: Scope::from_raw(u8::from(m.header.scope)),
            link_local: is_link_local(&ip),
            tentative,
        },
    ))
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// A unicast route of the main table; others (local, broadcast,
/// multicast, other tables, multipath) are left out.
pub(crate) fn parse_route(m: &RouteMessage, names: &HashMap<u32, String>) -> Option<Route> {
    if m.header.kind != RouteType::Unicast
        || route_table(m) != u32::from(RouteHeader::RT_TABLE_MAIN)
    {
        return None;
    }
    let mut dest = None;
    let mut gateway = None;
    let mut oif = None;
    let mut source = None;
    let mut metric = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dest = route_ip(d),
            RouteAttribute::Gateway(g) => gateway = route_ip(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(s) => source = route_ip(s),
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::MultiPath(_) => {
                tracing::debug!("skipping a multipath route");
                return None;
            }
            _ => {}
        }
    }
    let family = match m.header.address_family {
        rtnetlink::packet_route::AddressFamily::Inet => Family::V4,
        rtnetlink::packet_route::AddressFamily::Inet6 => Family::V6,
        _ => return None,
    };
    let plen = m.header.destination_prefix_length;
    let destination = match dest {
        Some(ip) => Some(IpPrefix::new(ip, plen)?),
        None if plen == 0 => None,
        None => return None,
    };
    Some(Route {
        family,
        destination,
        gateway,
        device: oif.and_then(|i| names.get(&i).cloned()),
        device_index: oif,
        source,
        scope: Scope::from_raw(u8::from(m.header.scope)),
        protocol: u8::from(m.header.protocol),
        metric,
    })
}

/// A permanent or reachable ARP/NDP entry with a link-layer address.
pub(crate) fn parse_neighbour(
    m: &NeighbourMessage,
    names: &HashMap<u32, String>,
) -> Option<Neighbour> {
    let state = match m.header.state {
        NlNeighState::Permanent => NeighbourState::Permanent,
        NlNeighState::Reachable => NeighbourState::Reachable,
        _ => return None,
    };
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(b) => mac = MacAddr::from_bytes(b),
            _ => {}
        }
    }
    let index = m.header.ifindex;
    Some(Neighbour {
        ip: ip?,
        mac: mac?,
        device: names.get(&index)?.clone(),
        device_index: index,
        state,
    })
}
