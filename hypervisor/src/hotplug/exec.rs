//! Running a [`DevicePlan`] against a live VM, undoing everything it created
//! when a later step fails.
use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{broadcast, Mutex};

use capsule_device_api::GuestAddress;
use capsule_device_api::{BackendError, BackendErrorKind};

use super::{failed, qmp_error, AddressPlan, DevicePlan, Step};
use crate::pci_path::find_pci_path;
use crate::qmp::{QmpClient, QmpError, QmpEvent};
use crate::vhost_probe::{self, ProbeError};

/// What hotplug and unplug run against.
pub struct ExecContext<'a> {
    pub qmp: &'a QmpClient,
    /// Tap queues handed over for network endpoints.
    pub taps: &'a crate::TapFds,
    /// Serialises the mutating QMP sequences of one VM (never held while
    /// waiting for a guest).
    pub serial: &'a Mutex<()>,
    pub unplug_timeout: Duration,
    pub vhost_probe_timeout: Duration,
}

/// Vets the vhost-user backend of `plan`, if any, before QEMU is touched.
pub async fn vet_backend(
    plan: &DevicePlan,
    timeout: Duration,
) -> Result<Option<OwnedFd>, BackendError> {
    let Some(socket) = &plan.vhost_socket else {
        return Ok(None);
    };
    match vhost_probe::probe(socket, timeout).await {
        Ok((fd, _features)) => Ok(Some(fd)),
        Err(e @ ProbeError::Timeout { .. }) => Err(BackendError::new(
            BackendErrorKind::Timeout,
            format!("device {}: {e}", plan.id),
        )),
        Err(e) => Err(failed(format!("device {}: {e}", plan.id))),
    }
}

/// Plugs `plan` into the running VM and returns the guest address. On error
/// whatever was created is removed again (see the error text when a device
/// could not be taken back because the guest did not release it).
pub async fn hotplug(
    ctx: &ExecContext<'_>,
    plan: &DevicePlan,
) -> Result<GuestAddress, BackendError> {
    let mut vhost_fd = vet_backend(plan, ctx.vhost_probe_timeout).await?;
    let guard = ctx.serial.lock().await;
    let mut done: Vec<&Step> = Vec::new();
    for step in &plan.steps {
        tracing::debug!(device = %plan.id, step = step.name(), "hotplug step");
        let res = match step {
            Step::Blockdev { args, .. } => run(ctx.qmp, "blockdev-add", args).await,
            Step::Object { args, .. } => run(ctx.qmp, "object-add", args).await,
            Step::Device { args, .. } => run(ctx.qmp, "device_add", args).await,
            Step::VhostChardev { id, .. } => match vhost_fd.take() {
                Some(fd) => add_vhost_chardev(ctx.qmp, plan, id, fd).await,
                None => Err((
                    "chardev-add",
                    QmpError::Protocol("no vetted backend connection".into()),
                )),
            },
            Step::TapNetdev { id, tap, queues } => match ctx.taps.take(tap, *queues) {
                Ok(fds) => add_tap_netdev(ctx.qmp, plan, id, fds).await,
                Err(m) => Err(("netdev_add", QmpError::Protocol(m))),
            },
        };
        if let Err((what, e)) = res {
            let cause = qmp_error(&plan.id, &format!("{what} {}", step.name()), &e);
            drop(guard);
            return Err(rollback_error(ctx, plan, &done, cause, &e).await);
        }
        done.push(step);
    }
    drop(guard);
    match resolve_address(ctx.qmp, plan).await {
        Ok(addr) => {
            tracing::info!(device = %plan.id, kind = plan.kind, address = ?addr, "hotplugged");
            Ok(addr)
        }
        Err((cause, e)) => Err(rollback_error(ctx, plan, &done, cause, &e).await),
    }
}

/// One QMP command of a plan step; a failure carries the command's name.
async fn run(
    qmp: &QmpClient,
    command: &'static str,
    args: &serde_json::Value,
) -> Result<(), (&'static str, QmpError)> {
    qmp.execute(command, Some(args.clone()))
        .await
        .map(drop)
        .map_err(|e| (command, e))
}

async fn add_vhost_chardev(
    qmp: &QmpClient,
    plan: &DevicePlan,
    id: &str,
    fd: OwnedFd,
) -> Result<(), (&'static str, QmpError)> {
    let fdname = crate::naming::Names::new(&plan.id)
        .map(|n| n.fdname())
        .unwrap_or_else(|_| format!("{id}-fd"));
    qmp.getfd(&fdname, fd).await.map_err(|e| ("getfd", e))?;
    let args = json!({
        "id": id,
        "backend": { "type": "socket", "data": {
            "addr": { "type": "fd", "data": { "str": fdname } },
            "server": false,
        }},
    });
    if let Err(e) = qmp.execute("chardev-add", Some(args)).await {
        // The named fd stays in the monitor unless consumed: close it.
        if let Err(ce) = qmp
            .execute("closefd", Some(json!({ "fdname": fdname })))
            .await
        {
            tracing::warn!(device = %plan.id, error = %ce, "closefd after a failed chardev-add");
        }
        return Err(("chardev-add", e));
    }
    Ok(())
}

/// Hands the tap queues to QEMU (`getfd` each) and makes the netdev; on
/// failure the named descriptors are closed again.
async fn add_tap_netdev(
    qmp: &QmpClient,
    plan: &DevicePlan,
    id: &str,
    fds: Vec<OwnedFd>,
) -> Result<(), (&'static str, QmpError)> {
    let names =
        crate::naming::Names::new(&plan.id).map_err(|e| ("getfd", QmpError::Protocol(e)))?;
    let mut given: Vec<String> = Vec::new();
    let mut result = Ok(());
    for (i, fd) in fds.into_iter().enumerate() {
        let name = names.queue_fd(i);
        if let Err(e) = qmp.getfd(&name, fd).await {
            result = Err(("getfd", e));
            break;
        }
        given.push(name);
    }
    if result.is_ok() {
        let mut args = json!({ "type": "tap", "id": id });
        if let Some(obj) = args.as_object_mut() {
            match given.as_slice() {
                [one] => obj.insert("fd".into(), json!(one)),
                many => obj.insert("fds".into(), json!(many.join(":"))),
            };
        }
        result = qmp
            .execute("netdev_add", Some(args))
            .await
            .map(drop)
            .map_err(|e| ("netdev_add", e));
    }
    if result.is_err() {
        // Named fds stay in the monitor unless consumed: close them.
        for name in &given {
            if let Err(ce) = qmp
                .execute("closefd", Some(json!({ "fdname": name })))
                .await
            {
                tracing::warn!(device = %plan.id, fd = %name, error = %ce, "closefd after a failed netdev_add");
            }
        }
    }
    result
}

async fn resolve_address(
    qmp: &QmpClient,
    plan: &DevicePlan,
) -> Result<GuestAddress, (BackendError, QmpError)> {
    let pci = |what: &str, e: QmpError| (qmp_error(&plan.id, what, &e), e);
    match &plan.address {
        AddressPlan::None => Ok(GuestAddress::None),
        AddressPlan::Scsi(addr) => Ok(GuestAddress::Scsi(*addr)),
        AddressPlan::Pci { device, predicted } => {
            let buses = qmp.query_pci().await.map_err(|e| pci("query-pci", e))?;
            let path = lookup(&buses, device, predicted.as_ref()).map_err(|m| {
                (
                    failed(format!("device {}: {m}", plan.id)),
                    QmpError::Protocol(m),
                )
            })?;
            Ok(GuestAddress::Pci(path))
        }
        AddressPlan::Vfio { devices, predicted } => {
            let buses = qmp.query_pci().await.map_err(|e| pci("query-pci", e))?;
            let mut paths = Vec::new();
            for (i, dev) in devices.iter().enumerate() {
                let p = lookup(&buses, dev, predicted.get(i).and_then(Option::as_ref)).map_err(
                    |m| {
                        (
                            failed(format!("device {}: {m}", plan.id)),
                            QmpError::Protocol(m),
                        )
                    },
                )?;
                paths.push(p);
            }
            Ok(GuestAddress::Vfio(paths))
        }
        AddressPlan::Pmem { device, index } => match index {
            Some(i) => Ok(GuestAddress::Pmem(*i)),
            None => {
                let slot = qmp
                    .execute("qom-get", Some(json!({ "path": format!("/machine/peripheral/{device}"), "property": "slot" })))
                    .await
                    .map_err(|e| pci("qom-get slot", e))?;
                let slot = slot
                    .as_u64()
                    .and_then(|s| u32::try_from(s).ok())
                    .ok_or_else(|| {
                        let m = format!("nvdimm {device} has no usable slot ({slot})");
                        (
                            failed(format!("device {}: {m}", plan.id)),
                            QmpError::Protocol(m),
                        )
                    })?;
                Ok(GuestAddress::Pmem(slot))
            }
        },
    }
}

fn lookup(
    buses: &[crate::qmp::PciBusInfo],
    device: &str,
    predicted: Option<&capsule_device_api::PciPath>,
) -> Result<capsule_device_api::PciPath, String> {
    let path = find_pci_path(buses, device)
        .ok_or_else(|| format!("{device} is not in query-pci after device_add"))?;
    if let Some(p) = predicted {
        if *p != path {
            tracing::warn!(device, predicted = %p, actual = %path, "PCI path differs from the layout's prediction");
        }
    }
    Ok(path)
}

/// Undoes `done` (newest first) and builds the error returned for `cause`.
async fn rollback_error(
    ctx: &ExecContext<'_>,
    plan: &DevicePlan,
    done: &[&Step],
    cause: BackendError,
    source: &QmpError,
) -> BackendError {
    if done.is_empty() {
        return cause;
    }
    if source.is_disconnected() {
        // QEMU is gone (or unreachable): nothing can be undone through it,
        // and a dead QEMU holds nothing.
        return BackendError::new(
            cause.kind,
            format!(
                "{}; QMP connection lost, rollback not possible",
                cause.message
            ),
        );
    }
    let _guard = ctx.serial.lock().await;
    match rollback(ctx, plan, done).await {
        Ok(()) => BackendError::new(cause.kind, format!("{}; rolled back", cause.message)),
        Err(leftover) => BackendError::new(
            cause.kind,
            format!("{}; ROLLBACK INCOMPLETE: {leftover}", cause.message),
        ),
    }
}

/// Removes the objects of `done`, newest first.
async fn rollback(ctx: &ExecContext<'_>, plan: &DevicePlan, done: &[&Step]) -> Result<(), String> {
    tracing::warn!(device = %plan.id, steps = done.len(), "rolling back a failed hotplug");
    // Devices first (they hold the backends), all at once.
    let devices: Vec<String> = done
        .iter()
        .filter_map(|s| match s {
            Step::Device { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect();
    if !devices.is_empty() {
        let remaining = match request_delete(ctx.qmp, &devices).await {
            Ok(mut waiter) => waiter.wait(ctx.qmp, ctx.unplug_timeout).await,
            Err(e) => return Err(format!("device_del: {e}")),
        };
        match remaining {
            Ok(r) if r.is_empty() => {}
            Ok(r) => {
                return Err(format!(
                    "the guest did not release {} within {:?}; their backends stay until a later unplug of {}",
                    r.join(", "),
                    ctx.unplug_timeout,
                    plan.id
                ))
            }
            Err(e) => return Err(format!("waiting for DEVICE_DELETED: {e}")),
        }
    }
    let mut errors = Vec::new();
    for step in done.iter().rev() {
        if let Err(e) = remove_backend(ctx.qmp, step).await {
            errors.push(format!("{}: {e}", step.name()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Removes one backend object (no-op for devices).
pub(crate) async fn remove_backend(qmp: &QmpClient, step: &Step) -> Result<(), QmpError> {
    let res = match step {
        Step::Device { .. } => return Ok(()),
        Step::Blockdev { node, .. } => {
            qmp.execute("blockdev-del", Some(json!({ "node-name": node })))
                .await
        }
        Step::VhostChardev { id, .. } => {
            qmp.execute("chardev-remove", Some(json!({ "id": id })))
                .await
        }
        Step::Object { id, .. } => qmp.execute("object-del", Some(json!({ "id": id }))).await,
        Step::TapNetdev { id, .. } => qmp.execute("netdev_del", Some(json!({ "id": id }))).await,
    };
    res.map(drop)
}

/// A `device_del` in flight: the event subscription taken before it.
pub struct DeleteWaiter {
    events: broadcast::Receiver<QmpEvent>,
    waiting: HashSet<String>,
}

/// Sends `device_del` for each present device of `ids` (subscribed to events
/// first). Devices already gone are skipped; a repeated `device_del` of a
/// device still being removed is harmless.
pub async fn request_delete(qmp: &QmpClient, ids: &[String]) -> Result<DeleteWaiter, QmpError> {
    let events = qmp.subscribe();
    let present: HashSet<String> = qmp
        .peripheral_devices()
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let mut waiting = HashSet::new();
    for id in ids.iter().filter(|id| present.contains(*id)) {
        match qmp.execute("device_del", Some(json!({ "id": id }))).await {
            Ok(_) => {
                waiting.insert(id.clone());
            }
            Err(QmpError::Command { ref class, .. }) if class == "DeviceNotFound" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(DeleteWaiter { events, waiting })
}

impl DeleteWaiter {
    /// Waits for `DEVICE_DELETED` of every device; returns those still
    /// present at the deadline.
    pub async fn wait(
        &mut self,
        qmp: &QmpClient,
        timeout: Duration,
    ) -> Result<Vec<String>, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.waiting.is_empty() {
            let events = &mut self.events;
            let next = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    ev = events.recv() => Some(ev),
                    _ = qmp.closed() => None,
                }
            })
            .await;
            match next {
                Ok(None) => {
                    return Err(QmpError::Disconnected {
                        command: Some("waiting for DEVICE_DELETED".into()),
                        reason: "QMP connection closed".into(),
                    })
                }
                Ok(Some(Ok(ev))) => {
                    if let Some(dev) = ev.deleted_device() {
                        if self.waiting.remove(dev) {
                            tracing::debug!(device = dev, "DEVICE_DELETED");
                        }
                    }
                }
                Ok(Some(Err(broadcast::error::RecvError::Lagged(n)))) => {
                    tracing::warn!(
                        missed = n,
                        "event stream lagged; re-reading the device list"
                    );
                    self.recheck(qmp).await?;
                }
                Ok(Some(Err(broadcast::error::RecvError::Closed))) => {
                    return Err(QmpError::Disconnected {
                        command: Some("waiting for DEVICE_DELETED".into()),
                        reason: "event stream closed".into(),
                    })
                }
                Err(_) => {
                    // Deadline: an event may have been missed across a
                    // reconnect; trust the device list.
                    self.recheck(qmp).await?;
                    break;
                }
            }
        }
        let mut left: Vec<String> = self.waiting.iter().cloned().collect();
        left.sort();
        Ok(left)
    }

    async fn recheck(&mut self, qmp: &QmpClient) -> Result<(), QmpError> {
        let present: HashSet<String> = qmp
            .peripheral_devices()
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        self.waiting.retain(|id| present.contains(id));
        Ok(())
    }
}
