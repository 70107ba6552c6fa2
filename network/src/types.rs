//! What discovery reports about a network namespace: links, addresses,
//! routes and neighbours, in plain serializable types (no netlink types
//! leak out of the crate).
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An Ethernet address, shown and serialized as `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The address in `bytes`, if it is 6 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(bytes).ok().map(Self)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts
                .next()
                .ok_or_else(|| format!("MAC address {s:?}: fewer than 6 bytes"))?;
            if p.len() != 2 {
                return Err(format!(
                    "MAC address {s:?}: byte {p:?} is not two hex digits"
                ));
            }
            *b = u8::from_str_radix(p, 16)
                .map_err(|_| format!("MAC address {s:?}: byte {p:?} is not hex"))?;
        }
        if parts.next().is_some() {
            return Err(format!("MAC address {s:?}: more than 6 bytes"));
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An address with its prefix length (`10.0.0.2/24`, `fd00::2/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpPrefix {
    /// `addr/prefix_len`, if the length fits the family (≤ 32 or ≤ 128).
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix_len <= max).then_some(Self { addr, prefix_len })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() {
            Self::V4
        } else {
            Self::V6
        }
    }
}

/// What kind of link it is (`IFLA_INFO_KIND`, and the link-layer type for
/// the kinds that have none, such as loopback and physical NICs).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    Loopback,
    Veth,
    Macvlan,
    Macvtap,
    Ipvlan,
    Vlan,
    /// A tap (kind `tun`, Ethernet link layer).
    Tap,
    /// A tun (kind `tun`, no link layer): not an L2 device.
    Tun,
    Bridge,
    Dummy,
    /// An Ethernet device without a kind (a physical NIC, a VF).
    Physical,
    /// Any other kind, by its kernel name (`vxlan`, `wireguard`...).
    Other(String),
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Loopback => "loopback",
            Self::Veth => "veth",
            Self::Macvlan => "macvlan",
            Self::Macvtap => "macvtap",
            Self::Ipvlan => "ipvlan",
            Self::Vlan => "vlan",
            Self::Tap => "tap",
            Self::Tun => "tun",
            Self::Bridge => "bridge",
            Self::Dummy => "dummy",
            Self::Physical => "physical",
            Self::Other(k) => k,
        };
        f.write_str(s)
    }
}

/// `IFLA_OPERSTATE` (RFC 2863).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperState {
    Unknown,
    NotPresent,
    Down,
    LowerLayerDown,
    Testing,
    Dormant,
    Up,
}

/// `ifa_scope` / `rtm_scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Universe,
    Site,
    Link,
    Host,
    Nowhere,
    Other(u8),
}

impl Scope {
    pub fn from_raw(v: u8) -> Self {
        match v {
            0 => Self::Universe,
            200 => Self::Site,
            253 => Self::Link,
            254 => Self::Host,
            255 => Self::Nowhere,
            v => Self::Other(v),
        }
    }

    pub fn raw(self) -> u8 {
        match self {
            Self::Universe => 0,
            Self::Site => 200,
            Self::Link => 253,
            Self::Host => 254,
            Self::Nowhere => 255,
            Self::Other(v) => v,
        }
    }
}

/// An address on a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub prefix: IpPrefix,
    pub scope: Scope,
    /// IPv6 `fe80::/10` or IPv4 `169.254.0.0/16`: the guest kernel makes its
    /// own IPv6 link-local address, so the shim normally skips these.
    pub link_local: bool,
    /// Still in duplicate address detection (IPv6 `IFA_F_TENTATIVE`).
    pub tentative: bool,
}

/// A link of the namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
    /// `None` for links without a hardware address (lo has all zeroes).
    pub mac: Option<MacAddr>,
    pub mtu: u32,
    pub oper_state: OperState,
    /// `IFF_UP` is set.
    pub up: bool,
    /// Index of the bridge/bond it is enslaved to.
    pub master: Option<u32>,
    /// `IFLA_IFALIAS`.
    pub alias: Option<String>,
    pub addresses: Vec<Address>,
}

impl LinkInfo {
    /// A tap that capsule-network created (its alias carries the marker).
    pub fn is_capsule_tap(&self) -> bool {
        self.kind == LinkKind::Tap
            && self
                .alias
                .as_deref()
                .is_some_and(|a| a.starts_with(crate::plumb::TAP_ALIAS_PREFIX))
    }

    /// A link carrying Ethernet frames that capsule can hand to the VM
    /// through a tap: not loopback, not a bridge, not a tun (L3), not
    /// enslaved to a bridge/bond, and not one of capsule's own taps.
    pub fn is_l2_endpoint(&self) -> bool {
        self.mac.is_some()
            && self.master.is_none()
            && !self.is_capsule_tap()
            && !matches!(
                self.kind,
                LinkKind::Loopback | LinkKind::Bridge | LinkKind::Tun
            )
    }
}

/// A route of the main table (unicast only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub family: Family,
    /// `None` for the default route.
    pub destination: Option<IpPrefix>,
    pub gateway: Option<IpAddr>,
    /// Output device (name and index) when the route has one.
    pub device: Option<String>,
    pub device_index: Option<u32>,
    /// Preferred source (`src`).
    pub source: Option<IpAddr>,
    pub scope: Scope,
    /// `rtm_protocol`: 2 = kernel (made for an address), 3 = boot, 4 =
    /// static, 9 = ra, 16 = dhcp...
    pub protocol: u8,
    pub metric: Option<u32>,
}

impl Route {
    pub fn is_default(&self) -> bool {
        self.destination.is_none_or(|d| d.prefix_len == 0)
    }

    /// A route the kernel made for an address (`proto kernel`): the guest
    /// kernel makes the same one when the agent adds the address.
    pub fn is_kernel_made(&self) -> bool {
        self.protocol == 2
    }
}

/// ARP (IPv4) or NDP (IPv6) neighbour state (discovery keeps these two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NeighbourState {
    Permanent,
    Reachable,
}

/// A neighbour entry with a link-layer address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: MacAddr,
    pub device: String,
    pub device_index: u32,
    pub state: NeighbourState,
}

/// Everything discovery found in one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsInfo {
    pub netns: PathBuf,
    pub links: Vec<LinkInfo>,
    /// Main-table unicast routes, IPv4 then IPv6.
    pub routes: Vec<Route>,
    /// Permanent and reachable entries.
    pub neighbours: Vec<Neighbour>,
}

impl NetnsInfo {
    pub fn link(&self, name: &str) -> Option<&LinkInfo> {
        self.links.iter().find(|l| l.name == name)
    }

    /// The links capsule can plumb ([`LinkInfo::is_l2_endpoint`]).
    pub fn endpoints(&self) -> impl Iterator<Item = &LinkInfo> {
        self.links.iter().filter(|l| l.is_l2_endpoint())
    }

    /// Routes through `link` (by index).
    pub fn routes_of<'a>(&'a self, link: &'a LinkInfo) -> impl Iterator<Item = &'a Route> {
        self.routes
            .iter()
            .filter(move |r| r.device_index == Some(link.index))
    }

    /// Neighbours on `link`.
    pub fn neighbours_of<'a>(&'a self, link: &'a LinkInfo) -> impl Iterator<Item = &'a Neighbour> {
        self.neighbours
            .iter()
            .filter(move |n| n.device_index == link.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_junk() {
        let m: MacAddr = "02:aB:0c:00:ff:10".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:0c:00:ff:10");
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"02:ab:0c:00:ff:10\"");
        for bad in [
            "",
            "02:ab",
            "02:ab:0c:00:ff:10:11",
            "02:ab:0c:00:ff:1",
            "zz:ab:0c:00:ff:10",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
        }
        assert!(MacAddr::from_bytes(&[0; 5]).is_none());
    }

    #[test]
    fn prefix_checks_length() {
        assert!(IpPrefix::new("10.0.0.1".parse().unwrap(), 33).is_none());
        assert!(IpPrefix::new("fd00::1".parse().unwrap(), 128).is_some());
        assert_eq!(
            IpPrefix::new("10.0.0.1".parse().unwrap(), 24)
                .unwrap()
                .to_string(),
            "10.0.0.1/24"
        );
    }
}
