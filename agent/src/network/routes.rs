//! Routes and neighbours of SetupNetwork, added (or replaced) in the
//! plan's order.
use std::net::IpAddr;

use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use super::link::Nl;
use super::plan::{NeighSpec, Plan, RouteSpec};
use crate::error::{AgentError, Result};

fn message(
    r: &RouteSpec,
    index: u32,
    what: &str,
) -> Result<rtnetlink::packet_route::route::RouteMessage> {
    let bad = |e: &dyn std::fmt::Display| AgentError::invalid(format!("{what}: {e}"));
    let mut b = RouteMessageBuilder::<IpAddr>::new();
    b.get_mut().header.address_family = if r.v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    if let Some((dst, len)) = r.destination {
        b = b.destination_prefix(dst, len).map_err(|e| bad(&e))?;
    }
    if let Some(g) = r.gateway {
        b = b.gateway(g).map_err(|e| bad(&e))?;
    }
    if let Some(s) = r.source {
        b = b.pref_source(s).map_err(|e| bad(&e))?;
    }
    if let Some(m) = r.metric {
        b = b.priority(m);
    }
    Ok(b.output_interface(index)
        .scope(RouteScope::from(r.scope))
        .build())
}

/// Adds the routes, in order; a route with the same key is replaced.
pub async fn add_routes(nl: &Nl, plan: &Plan, indexes: &[u32]) -> Result<()> {
    for r in &plan.routes {
        let what = r.what(plan);
        let msg = message(r, indexes[r.device], &what)?;
        nl.call(
            format!("network: add {what}"),
            nl.handle.route().add(msg).replace().execute(),
        )
        .await?;
    }
    Ok(())
}

/// Adds the neighbours as permanent entries (replacing any entry).
pub async fn add_neighbours(nl: &Nl, plan: &Plan, indexes: &[u32]) -> Result<()> {
    for n in &plan.neighbours {
        let NeighSpec { ip, mac, device } = n;
        let dev = &plan.interfaces[*device].name;
        nl.call(
            format!(
                "network: add neighbour {ip} lladdr {} dev {dev:?}",
                super::plan::mac_str(mac)
            ),
            nl.handle
                .neighbours()
                .add(indexes[*device], *ip)
                .link_layer_address(mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute(),
        )
        .await?;
    }
    Ok(())
}
