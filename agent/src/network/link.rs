//! Netlink in the guest: a session with a deadline on every request,
//! finding interfaces by MAC (waiting for hot-plugged ones on link
//! notifications), renaming, MTU, addresses, up.
use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::NetlinkMessage;
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::SocketAddr;
use rtnetlink::{Handle, LinkUnspec, MulticastGroup};
use tokio::time::Instant;

use super::plan::{mac_str, Iface};
use crate::error::{AgentError, Result};

/// Deadline of one netlink request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

type Events = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

pub struct Nl {
    pub handle: Handle,
    events: Events,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Nl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The errno of a netlink NACK (positive).
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A guest link as far as the setup cares.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
}

fn parse_link(m: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(b) => mac = <[u8; 6]>::try_from(b.as_slice()).ok(),
            _ => {}
        }
    }
    Some(Link {
        index: m.header.index,
        name: name?,
        mac,
        up: m.header.flags.contains(LinkFlags::Up),
    })
}

impl Nl {
    /// A session that also receives link notifications (for the wait).
    pub fn connect() -> Result<Self> {
        let (conn, handle, events) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
                .map_err(|e| AgentError::internal("network: open a netlink socket", e))?;
        let task = tokio::spawn(conn);
        Ok(Self {
            handle,
            events,
            task,
        })
    }

    pub async fn call<T>(
        &self,
        op: impl Display,
        fut: impl Future<Output = std::result::Result<T, rtnetlink::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Err(_) => Err(AgentError::DeadlineExceeded(format!(
                "{op}: no answer from the kernel within {REQUEST_TIMEOUT:?}"
            ))),
            Ok(Err(e)) => Err(AgentError::Internal(format!("{op}: {e}"))),
            Ok(Ok(v)) => Ok(v),
        }
    }

    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self
            .call(
                "network: list links",
                self.handle.link().get().execute().try_collect(),
            )
            .await?;
        Ok(msgs.iter().filter_map(parse_link).collect())
    }

    /// The link of each interface, by MAC. Hot-plugged devices may appear
    /// after the request: re-reads the links on each link notification
    /// until all are there or `timeout` passes.
    pub async fn wait_for(&mut self, ifaces: &[Iface], timeout: Duration) -> Result<Vec<Link>> {
        let deadline = Instant::now() + timeout;
        loop {
            let links = self.links().await?;
            let mut found = Vec::new();
            let mut missing = Vec::new();
            for i in ifaces {
                let with_mac: Vec<&Link> = links.iter().filter(|l| l.mac == Some(i.mac)).collect();
                match with_mac.as_slice() {
                    [one] => found.push((*one).clone()),
                    [] => missing.push(i.what()),
                    many => {
                        return Err(AgentError::FailedPrecondition(format!(
                            "{}: {} guest links have that MAC: {}",
                            i.what(),
                            many.len(),
                            many.iter()
                                .map(|l| l.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )))
                    }
                }
            }
            if missing.is_empty() {
                return Ok(found);
            }
            // Wait for any link notification, then look again.
            match tokio::time::timeout_at(deadline, self.events.next()).await {
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(AgentError::Internal(
                        "network: the netlink notification stream ended".into(),
                    ))
                }
                Err(_) => {
                    let have = links
                        .iter()
                        .map(|l| match l.mac {
                            Some(m) => format!("{} ({})", l.name, mac_str(&m)),
                            None => l.name.clone(),
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(AgentError::DeadlineExceeded(format!(
                        "network: {} did not appear within {timeout:?} (guest links: {have})",
                        missing.join(", ")
                    )));
                }
            }
        }
    }

    pub async fn set_down(&self, l: &Link) -> Result<()> {
        self.call(
            format!("link {:?}: set down", l.name),
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(l.index).down().build())
                .execute(),
        )
        .await
    }

    pub async fn rename(&self, l: &Link, to: &str) -> Result<()> {
        self.call(
            format!("link {:?}: rename to {to:?}", l.name),
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(l.index)
                        .name(to.to_string())
                        .build(),
                )
                .execute(),
        )
        .await
    }

    pub async fn set_mtu_up(&self, index: u32, iface: &Iface) -> Result<()> {
        if iface.mtu != 0 {
            self.call(
                format!("{}: set MTU {}", iface.what(), iface.mtu),
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).mtu(iface.mtu).build())
                    .execute(),
            )
            .await?;
        }
        self.call(
            format!("{}: set up", iface.what()),
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute(),
        )
        .await
    }

    /// Makes the interface's addresses exactly `iface.addresses` (IPv6
    /// link-local ones excepted). IPv6 addresses skip duplicate address
    /// detection: the pod's namespace already owns them.
    pub async fn sync_addresses(&self, index: u32, iface: &Iface) -> Result<()> {
        let what = iface.what();
        let msgs: Vec<AddressMessage> = self
            .call(
                format!("{what}: list addresses"),
                self.handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .execute()
                    .try_collect(),
            )
            .await?;
        let mut have: HashMap<(IpAddr, u8), AddressMessage> = HashMap::new();
        for m in msgs.into_iter().filter(|m| m.header.index == index) {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = ip {
                have.insert((ip, m.header.prefix_len), m);
            }
        }
        for (key, m) in &have {
            let v6_link_local =
                matches!(key.0, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
            if !v6_link_local && !iface.addresses.contains(key) {
                self.call(
                    format!("{what}: remove address {}/{}", key.0, key.1),
                    self.handle.address().del(m.clone()).execute(),
                )
                .await?;
            }
        }
        for &(ip, len) in &iface.addresses {
            if have.contains_key(&(ip, len)) {
                continue;
            }
            let mut req = self.handle.address().add(index, ip, len).replace();
            if ip.is_ipv6() {
                req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
            }
            self.call(format!("{what}: add address {ip}/{len}"), req.execute())
                .await?;
        }
        Ok(())
    }
}
