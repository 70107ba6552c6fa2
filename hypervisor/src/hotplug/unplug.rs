//! Unplugging: `device_del`, wait for the guest (`DEVICE_DELETED`), then
//! remove the backends. A device the guest has not released in time is
//! reported [`UnplugOutcome::Pending`] and keeps its backends; calling
//! unplug again re-issues `device_del` and waits again.
use capsule_device_api::{BackendError, BackendErrorKind, UnplugOutcome};

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

/// Removes the backends of `plan` that still exist, newest first. Each is
/// removed straight away; only when QEMU refuses is its list queried, to
/// tell a backend already gone (a repeated unplug after a crash) from a
/// real failure. So the common path costs one command per backend, however
/// many devices the VM has.
async fn remove_backends(ctx: &ExecContext<'_>, plan: &DevicePlan) -> Result<(), BackendError> {
    let mut errors = Vec::new();
    for step in plan.steps.iter().rev() {
        if matches!(step, Step::Device { .. }) {
            continue;
        }
        let Err(e) = remove_backend(ctx.qmp, step).await else {
            continue;
        };
        match backend_present(ctx, step).await {
            Ok(false) => {
                tracing::debug!(device = %plan.id, backend = %step.name(), "backend already gone");
            }
            Ok(true) => errors.push(format!("removing {}: {e}", step.name())),
            Err(q) => errors.push(format!(
                "removing {}: {e} (and checking whether it exists: {q})",
                step.name()
            )),
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

/// Whether the backend of `step` exists in QEMU.
async fn backend_present(ctx: &ExecContext<'_>, step: &Step) -> Result<bool, QmpError> {
    Ok(match step {
        Step::Device { .. } => false,
        Step::Blockdev { node, .. } => ctx
            .qmp
            .query_named_block_nodes()
            .await?
            .iter()
            .any(|n| &n.node_name == node),
        Step::VhostChardev { id, .. } => ctx
            .qmp
            .query_chardev()
            .await?
            .iter()
            .any(|c| &c.label == id),
        Step::Object { id, .. } => ctx.qmp.user_objects().await?.iter().any(|(n, _)| n == id),
        // QEMU 7.2 lists no netdevs; a refused `netdev_del` of one that
        // exists is an error worth reporting.
        Step::TapNetdev { .. } => true,
    })
}
