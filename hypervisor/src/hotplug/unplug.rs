//! Unplugging: `device_del`, wait for the guest (`DEVICE_DELETED`), then
//! remove the backends. A device the guest has not released in time is
//! reported [`UnplugOutcome::Pending`] and keeps its backends; calling
//! unplug again re-issues `device_del` and waits again.
use std::collections::HashSet;

use capsule_devmgr::backend::{BackendError, BackendErrorKind, UnplugOutcome};

use super::exec::{remove_backend, request_delete, ExecContext};
use super::{qmp_error, DevicePlan, Step};
use crate::qmp::QmpError;

pub async fn unplug(
    ctx: &ExecContext<'_>,
    plan: &DevicePlan,
) -> Result<UnplugOutcome, BackendError> {
    if let Some(why) = plan.unplug_unsupported {
        return Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!("device {}: {why}", plan.id),
        ));
    }
    let ids: Vec<String> = plan.device_ids().into_iter().map(str::to_owned).collect();
    let mut waiter = {
        let _guard = ctx.serial.lock().await;
        request_delete(ctx.qmp, &ids)
            .await
            .map_err(|e| qmp_error(&plan.id, "device_del", &e))?
    };
    // The guest's turn: no lock held while it decides.
    let remaining = waiter
        .wait(ctx.qmp, ctx.unplug_timeout)
        .await
        .map_err(|e| qmp_error(&plan.id, "waiting for DEVICE_DELETED", &e))?;
    if !remaining.is_empty() {
        tracing::warn!(
            device = %plan.id,
            pending = ?remaining,
            timeout = ?ctx.unplug_timeout,
            "guest has not released the device; unplug pending, backends kept"
        );
        return Ok(UnplugOutcome::Pending);
    }
    let _guard = ctx.serial.lock().await;
    remove_backends(ctx, plan).await?;
    tracing::info!(device = %plan.id, kind = plan.kind, "unplugged");
    Ok(UnplugOutcome::Removed)
}

/// Removes the backends of `plan` that still exist, newest first.
async fn remove_backends(ctx: &ExecContext<'_>, plan: &DevicePlan) -> Result<(), BackendError> {
    let wrap = |what: &str, e: QmpError| qmp_error(&plan.id, what, &e);
    let has = |f: fn(&Step) -> bool| plan.steps.iter().any(f);
    let nodes: HashSet<String> = if has(|s| matches!(s, Step::Blockdev { .. })) {
        ctx.qmp
            .query_named_block_nodes()
            .await
            .map_err(|e| wrap("query-named-block-nodes", e))?
            .into_iter()
            .map(|n| n.node_name)
            .collect()
    } else {
        HashSet::new()
    };
    let chardevs: HashSet<String> = if has(|s| matches!(s, Step::VhostChardev { .. })) {
        ctx.qmp
            .query_chardev()
            .await
            .map_err(|e| wrap("query-chardev", e))?
            .into_iter()
            .map(|c| c.label)
            .collect()
    } else {
        HashSet::new()
    };
    let objects: HashSet<String> = if has(|s| matches!(s, Step::Object { .. })) {
        ctx.qmp
            .user_objects()
            .await
            .map_err(|e| wrap("qom-list /objects", e))?
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    } else {
        HashSet::new()
    };
    let mut errors = Vec::new();
    for step in plan.steps.iter().rev() {
        let present = match step {
            Step::Device { .. } => false,
            Step::Blockdev { node, .. } => nodes.contains(node),
            Step::VhostChardev { id, .. } => chardevs.contains(id),
            Step::Object { id, .. } => objects.contains(id),
        };
        if !present {
            continue;
        }
        if let Err(e) = remove_backend(ctx.qmp, step).await {
            errors.push(format!("removing {}: {e}", step.name()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(BackendError::new(
            BackendErrorKind::Failed,
            format!(
                "device {}: the device is gone but {}",
                plan.id,
                errors.join("; ")
            ),
        ))
    }
}
