//! SetupNetwork, checked and typed: every address, prefix and MAC parsed,
//! every route and neighbour tied to an interface of the request, routes in
//! the order the kernel accepts them.
use std::net::IpAddr;
use std::time::Duration;

use capsule_agent_protocol::agent::{IpFamily, SetupNetworkRequest};

use crate::error::{AgentError, Result};

/// How long interfaces may take to appear when the request says nothing.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest wait a request may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65535;
const IFNAME_MAX: usize = 15;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub mac: [u8; 6],
    /// 0: leave the device's MTU.
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

impl Iface {
    pub fn what(&self) -> String {
        format!("interface {:?} ({})", self.name, mac_str(&self.mac))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub v6: bool,
    /// `None`: the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// Index into [`Plan::interfaces`].
    pub device: usize,
    pub source: Option<IpAddr>,
    pub scope: u8,
    pub metric: Option<u32>,
}

impl RouteSpec {
    pub fn what(&self, plan: &Plan) -> String {
        let dst = match self.destination {
            None => "default".to_string(),
            Some((a, l)) => format!("{a}/{l}"),
        };
        let via = self
            .gateway
            .map(|g| format!(" via {g}"))
            .unwrap_or_default();
        format!("route {dst}{via} dev {}", plan.interfaces[self.device].name)
    }

    /// Routes go in this order: link scope or directly connected first,
    /// then those through a gateway, default routes last (a gateway must
    /// be reachable when its route is added).
    fn rank(&self) -> u8 {
        if self.destination.is_none() || self.destination.is_some_and(|(_, l)| l == 0) {
            2
        } else if self.gateway.is_some() {
            1
        } else {
            0
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighSpec {
    pub ip: IpAddr,
    pub mac: [u8; 6],
    pub device: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub interfaces: Vec<Iface>,
    /// Sorted: see [`RouteSpec::rank`].
    pub routes: Vec<RouteSpec>,
    pub neighbours: Vec<NeighSpec>,
    pub timeout: Duration,
}

pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(what: &str, s: &str) -> Result<[u8; 6]> {
    let bad = || AgentError::invalid(format!("{what}: MAC {s:?} is not aa:bb:cc:dd:ee:ff"));
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if out == [0; 6] || out[0] & 1 == 1 {
        return Err(AgentError::invalid(format!(
            "{what}: MAC {s:?} is not a unicast address"
        )));
    }
    Ok(out)
}

fn parse_ip(what: &str, s: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| AgentError::invalid(format!("{what}: {s:?} is not an IP address")))
}

fn parse_opt_ip(what: &str, s: &str) -> Result<Option<IpAddr>> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_ip(what, s).map(Some)
    }
}

fn parse_prefix(what: &str, s: &str) -> Result<(IpAddr, u8)> {
    let bad = || AgentError::invalid(format!("{what}: {s:?} is not an address/prefix-length"));
    let (a, l) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = a.parse().map_err(|_| bad())?;
    let len: u8 = l.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok((ip, len))
}

fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= IFNAME_MAX
        && n != "."
        && n != ".."
        && !n
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

/// Checks and types the request.
pub fn plan(req: &SetupNetworkRequest) -> Result<Plan> {
    let mut interfaces: Vec<Iface> = Vec::new();
    for (i, it) in req.interfaces.iter().enumerate() {
        let what = format!("interface {i} {:?}", it.name);
        if !valid_ifname(&it.name) {
            return Err(AgentError::invalid(format!(
                "{what}: not a valid interface name (1..=15 bytes, no '/', ':' or spaces)"
            )));
        }
        if it.name == "lo" {
            return Err(AgentError::invalid(format!(
                "{what}: lo is the guest's own"
            )));
        }
        let mac = parse_mac(&what, &it.mac)?;
        if it.mtu != 0 && !(MIN_MTU..=MAX_MTU).contains(&it.mtu) {
            return Err(AgentError::invalid(format!(
                "{what}: MTU {} outside {MIN_MTU}..={MAX_MTU}",
                it.mtu
            )));
        }
        if let Some(o) = interfaces
            .iter()
            .find(|o| o.name == it.name || o.mac == mac)
        {
            return Err(AgentError::invalid(format!(
                "{what}: same name or MAC as {}",
                o.what()
            )));
        }
        let addresses = it
            .addresses
            .iter()
            .map(|a| parse_prefix(&what, a))
            .collect::<Result<Vec<_>>>()?;
        interfaces.push(Iface {
            name: it.name.clone(),
            mac,
            mtu: it.mtu,
            addresses,
        });
    }
    let device_of = |what: &str, name: &str| {
        interfaces
            .iter()
            .position(|i| i.name == name)
            .ok_or_else(|| {
                AgentError::invalid(format!(
                    "{what}: device {name:?} is not an interface of the request"
                ))
            })
    };

    let mut routes = Vec::new();
    for (i, r) in req.routes.iter().enumerate() {
        let what = format!("route {i} to {:?}", r.destination);
        let destination = if r.destination.is_empty() {
            None
        } else {
            Some(parse_prefix(&what, &r.destination)?)
        };
        let gateway = parse_opt_ip(&what, &r.gateway)?;
        let source = parse_opt_ip(&what, &r.source)?;
        let family = r.family.enum_value().map_err(|v| {
            AgentError::invalid(format!("{what}: family {v} is not a known IpFamily"))
        })?;
        let mut v6 = match family {
            IpFamily::IP_FAMILY_V4 => Some(false),
            IpFamily::IP_FAMILY_V6 => Some(true),
            IpFamily::IP_FAMILY_UNSPECIFIED => None,
        };
        for ip in destination
            .map(|d| d.0)
            .iter()
            .chain(&gateway)
            .chain(&source)
        {
            match v6 {
                None => v6 = Some(ip.is_ipv6()),
                Some(f) if f != ip.is_ipv6() => {
                    return Err(AgentError::invalid(format!(
                        "{what}: mixes IPv4 and IPv6 ({ip})"
                    )))
                }
                Some(_) => {}
            }
        }
        let v6 = v6.ok_or_else(|| {
            AgentError::invalid(format!(
                "{what}: a default route without gateway needs its family"
            ))
        })?;
        let scope = u8::try_from(r.scope).map_err(|_| {
            AgentError::invalid(format!("{what}: scope {} is not 0..=255", r.scope))
        })?;
        routes.push(RouteSpec {
            v6,
            destination,
            gateway,
            device: device_of(&what, &r.device)?,
            source,
            scope,
            metric: (r.metric != 0).then_some(r.metric),
        });
    }
    // Stable: the shim's order is kept within a rank.
    routes.sort_by_key(RouteSpec::rank);

    let mut neighbours = Vec::new();
    for (i, n) in req.neighbours.iter().enumerate() {
        let what = format!("neighbour {i} {:?}", n.ip);
        neighbours.push(NeighSpec {
            ip: parse_ip(&what, &n.ip)?,
            mac: parse_mac(&what, &n.mac)?,
            device: device_of(&what, &n.device)?,
        });
    }

    let timeout = match req.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(ms.into()).min(MAX_TIMEOUT),
    };
    Ok(Plan {
        interfaces,
        routes,
        neighbours,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_agent_protocol::agent::{Interface, Neighbour, Route};

    fn iface(name: &str, mac: &str, addrs: &[&str]) -> Interface {
        let mut i = Interface::new();
        i.name = name.into();
        i.mac = mac.into();
        i.mtu = 1500;
        i.addresses = addrs.iter().map(|s| s.to_string()).collect();
        i
    }

    fn route(dst: &str, gw: &str, dev: &str) -> Route {
        let mut r = Route::new();
        r.destination = dst.into();
        r.gateway = gw.into();
        r.device = dev.into();
        r
    }

    fn req() -> SetupNetworkRequest {
        let mut r = SetupNetworkRequest::new();
        r.interfaces.push(iface(
            "eth0",
            "02:00:0a:00:00:02",
            &["10.0.0.2/24", "fd00::2/64"],
        ));
        r
    }

    #[test]
    fn orders_routes_link_scope_first_default_last() {
        let mut r = req();
        r.routes.push(route("", "10.0.0.1", "eth0"));
        r.routes.push(route("10.1.0.0/16", "10.0.0.1", "eth0"));
        r.routes.push(route("", "fd00::1", "eth0"));
        r.routes.push(route("10.0.0.0/24", "", "eth0"));
        let p = plan(&r).unwrap();
        let order: Vec<String> = p.routes.iter().map(|x| x.what(&p)).collect();
        assert_eq!(
            order,
            [
                "route 10.0.0.0/24 dev eth0",
                "route 10.1.0.0/16 via 10.0.0.1 dev eth0",
                "route default via 10.0.0.1 dev eth0",
                "route default via fd00::1 dev eth0",
            ]
        );
        assert!(!p.routes[2].v6 && p.routes[3].v6);
        assert_eq!(p.interfaces[0].addresses.len(), 2);
        assert_eq!(p.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn refuses_bad_input_naming_it() {
        type Edit = Box<dyn Fn(&mut SetupNetworkRequest)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|r| r.interfaces[0].mac = "02:00:0a:00:00".into()),
                "MAC",
            ),
            (
                Box::new(|r| r.interfaces[0].mac = "01:00:5e:00:00:01".into()),
                "unicast",
            ),
            (
                Box::new(|r| r.interfaces[0].name = "a/b".into()),
                "interface name",
            ),
            (
                Box::new(|r| r.interfaces[0].name = "0123456789abcdef".into()),
                "interface name",
            ),
            (Box::new(|r| r.interfaces[0].name = "lo".into()), "lo"),
            (Box::new(|r| r.interfaces[0].mtu = 67), "MTU 67"),
            (
                Box::new(|r| r.interfaces[0].addresses.push("10.0.0.3".into())),
                "prefix",
            ),
            (
                Box::new(|r| r.interfaces[0].addresses.push("10.0.0.3/33".into())),
                "prefix",
            ),
            (
                Box::new(|r| r.interfaces.push(iface("eth1", "02:00:0a:00:00:02", &[]))),
                "same name or MAC",
            ),
            (
                Box::new(|r| r.routes.push(route("", "10.0.0.1", "eth7"))),
                "\"eth7\"",
            ),
            (
                Box::new(|r| r.routes.push(route("10.1.0.0/16", "fd00::1", "eth0"))),
                "mixes",
            ),
            (Box::new(|r| r.routes.push(route("", "", "eth0"))), "family"),
            (
                Box::new(|r| {
                    let mut n = Neighbour::new();
                    n.ip = "10.0.0.1".into();
                    n.mac = "zz".into();
                    n.device = "eth0".into();
                    r.neighbours.push(n)
                }),
                "MAC",
            ),
        ];
        for (f, want) in cases {
            let mut r = req();
            f(&mut r);
            let e = plan(&r).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
            assert!(e.to_string().contains(want), "{e} (wanted {want:?})");
        }
    }

    #[test]
    fn timeout_defaults_and_is_capped() {
        let mut r = req();
        r.timeout_ms = 1500;
        assert_eq!(plan(&r).unwrap().timeout, Duration::from_millis(1500));
        r.timeout_ms = u32::MAX;
        assert_eq!(plan(&r).unwrap().timeout, MAX_TIMEOUT);
    }
}
