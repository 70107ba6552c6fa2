//! SetupNetwork: makes the guest's virtio-net interfaces look like the
//! pod's links. Each interface is found by MAC (waiting for hot-plugged
//! ones), renamed to the pod link's name, given its MTU and exactly its
//! addresses, and set up; then routes (link scope first, default last) and
//! permanent neighbours are added. Idempotent: a second identical request
//! changes nothing. Requests are serialized.
//!
//! [`plan`] checks the request, [`link`] and [`routes`] talk rtnetlink.
pub mod link;
pub mod plan;
pub mod routes;

use capsule_agent_protocol::agent::SetupNetworkRequest;

use crate::error::{AgentError, Result};
use link::{Link, Nl};
use plan::Plan;

/// The guest's network configurator (one per agent).
#[derive(Default)]
pub struct Network {
    lock: tokio::sync::Mutex<()>,
}

impl Network {
    pub fn new() -> Self {
        Self::default()
    }

    pub async fn setup(&self, req: &SetupNetworkRequest) -> Result<()> {
        let plan = plan::plan(req)?;
        let _one_at_a_time = self.lock.lock().await;
        apply(&plan).await
    }
}

async fn apply(plan: &Plan) -> Result<()> {
    let mut nl = Nl::connect()?;
    let found = nl.wait_for(&plan.interfaces, plan.timeout).await?;
    rename_all(&nl, plan, &found).await?;
    let indexes: Vec<u32> = found.iter().map(|l| l.index).collect();
    for (iface, index) in plan.interfaces.iter().zip(&indexes) {
        nl.set_mtu_up(*index, iface).await?;
        nl.sync_addresses(*index, iface).await?;
    }
    routes::add_routes(&nl, plan, &indexes).await?;
    routes::add_neighbours(&nl, plan, &indexes).await?;
    tracing::info!(
        interfaces = plan.interfaces.len(),
        routes = plan.routes.len(),
        neighbours = plan.neighbours.len(),
        "network configured"
    );
    Ok(())
}

/// Gives every interface its name. A name may be held by another
/// interface of the request (two devices whose guest names are swapped):
/// those are first moved to temporary names. A name held by a guest link
/// outside the request is refused.
async fn rename_all(nl: &Nl, plan: &Plan, found: &[Link]) -> Result<()> {
    let todo: Vec<(usize, &Link)> = found
        .iter()
        .enumerate()
        .filter(|(i, l)| l.name != plan.interfaces[*i].name)
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let all = nl.links().await?;
    for (i, _) in &todo {
        let want = &plan.interfaces[*i].name;
        if let Some(holder) = all.iter().find(|l| &l.name == want) {
            if !found.iter().any(|f| f.index == holder.index) {
                return Err(AgentError::FailedPrecondition(format!(
                    "{}: the name is taken by guest link {} that is not in the request",
                    plan.interfaces[*i].what(),
                    holder.index
                )));
            }
        }
    }
    // A link must be down to be renamed; set_mtu_up brings it up again.
    let mut moved = Vec::new();
    for (i, l) in &todo {
        if l.up {
            nl.set_down(l).await?;
        }
        let tmp = format!("capsule-net{i}");
        nl.rename(l, &tmp).await?;
        moved.push((
            *i,
            Link {
                name: tmp,
                ..(*l).clone()
            },
        ));
    }
    for (i, l) in &moved {
        nl.rename(l, &plan.interfaces[*i].name).await?;
    }
    Ok(())
}
