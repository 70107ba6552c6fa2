//! Container devices through the device manager: resolution, reference and
//! attach counting, rollback. The manager's backend is the hypervisor's
//! `VmSlot` (cold-plug before boot, hotplug after).
use capsule_devmgr::{oci, DetachOutcome, DeviceId, DeviceInfo, DeviceManager, Resolver};

use super::convert::agent_device;
use super::AttachedDevice;
use crate::error::{Error, Result};
use crate::fault;

/// An attach failure, named by the container's request.
fn attach_error(info: &DeviceInfo, e: capsule_devmgr::ManagerError) -> Error {
    let desc = capsule_devmgr::resolve::describe(info);
    let kind = Error::from_manager_kind(&e);
    let msg = match e {
        capsule_devmgr::ManagerError::Backend {
            op, source, note, ..
        } => format!("capsule: device {desc}: {op} failed in the hypervisor: {source}{note}"),
        other => format!("capsule: device {desc}: {other}"),
    };
    Error::new(kind, msg)
}

fn user_error(e: impl Into<Error>) -> Error {
    let e: Error = e.into();
    if e.message.starts_with("capsule: ") {
        e
    } else {
        let m = format!("capsule: {}", e.message);
        Error::new(e.kind, m)
    }
}

/// Resolves and attaches every `linux.devices` entry of `spec`, in order.
/// All or nothing: on an error the ones attached before are detached again.
pub async fn attach_all(
    mgr: &DeviceManager,
    resolver: &Resolver,
    spec: &oci_spec::runtime::Spec,
) -> Result<Vec<AttachedDevice>> {
    let infos = oci::spec_devices(spec).map_err(user_error)?;
    let mut done: Vec<AttachedDevice> = Vec::new();
    for info in infos {
        match attach_one(mgr, resolver, &info).await {
            Ok(d) => done.push(d),
            Err(e) => {
                let trouble = detach_all(mgr, &done).await;
                return Err(match trouble {
                    Ok(()) => e,
                    Err(t) => e.note(format!(
                        "rolling back the devices attached before failed: {t}"
                    )),
                });
            }
        }
    }
    Ok(done)
}

async fn attach_one(
    mgr: &DeviceManager,
    resolver: &Resolver,
    info: &DeviceInfo,
) -> Result<AttachedDevice> {
    let host = resolver.resolve(info).map_err(user_error)?;
    let id = mgr.new_device(host).map_err(user_error)?;
    fault::point("attach.device-recorded");
    let undo_ref = |e: Error| async move {
        match mgr.remove_use(&id, Some(info)).await {
            Ok(_) => e,
            Err(r) => e.note(format!("dropping its reference failed: {r}")),
        }
    };
    let addr = match mgr.attach(&id).await {
        Ok(a) => a,
        Err(e) => return Err(undo_ref(attach_error(info, e)).await),
    };
    let converted = mgr
        .get(&id)
        .ok_or_else(|| Error::internal(format!("device {id} vanished after attach")))
        .and_then(|rec| agent_device(&id.to_string(), &rec.kind, rec.driver, info, &addr));
    match converted {
        Ok(agent) => Ok(AttachedDevice {
            id: id.to_string(),
            info: info.clone(),
            agent,
        }),
        Err(e) => {
            let e = match mgr.detach(&id).await {
                Ok(_) => e,
                Err(d) => e.note(format!("detaching it again failed: {d}")),
            };
            Err(undo_ref(user_error(e)).await)
        }
    }
}

/// Drops the uses in `devices` (reverse order): each detach decrements the
/// attach count, the last one unplugs. Tries every device; reports the
/// first failure.
pub async fn detach_all(mgr: &DeviceManager, devices: &[AttachedDevice]) -> Result<()> {
    let mut first: Option<Error> = None;
    for d in devices.iter().rev() {
        if let Err(e) = detach_one(mgr, d).await {
            tracing::warn!(device = %d.id, error = %e, "detach failed");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

async fn detach_one(mgr: &DeviceManager, d: &AttachedDevice) -> Result<()> {
    let id: DeviceId =
        d.id.parse()
            .map_err(|e: String| Error::internal(format!("device id {}: {e}", d.id)))?;
    if mgr.get(&id).is_none() {
        return Ok(());
    }
    match mgr.detach(&id).await {
        Ok(DetachOutcome::Detached) => fault::point("detach.unplugged"),
        Ok(DetachOutcome::StillAttached { .. }) => {}
        Ok(DetachOutcome::Pending) => {
            return Err(Error::internal(format!(
                "device {} ({}): the guest has not released it yet (unplug pending)",
                d.id,
                d.info.container_path.display()
            )))
        }
        // Not attached any more (an earlier detach went through but the
        // reference removal did not): just drop the reference.
        Err(capsule_devmgr::ManagerError::Refused { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    mgr.remove_use(&id, Some(&d.info)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use capsule_devmgr::testing::{BackendOp, RecordingBackend};
    use capsule_devmgr::{BlockDriver, ManagerConfig, NullStore, ResolverConfig};

    /// A fake /sys and /dev with loop devices b 7:N.
    fn host(dir: &std::path::Path, n: u32) -> Resolver {
        let sys = dir.join("sys");
        let dev = dir.join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        for i in 0..n {
            let d = sys.join(format!("dev/block/7:{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("uevent"),
                format!("MAJOR=7\nMINOR={i}\nDEVNAME=loop{i}\nDEVTYPE=disk\n"),
            )
            .unwrap();
            nix::sys::stat::mknod(
                &dev.join(format!("loop{i}")),
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                nix::sys::stat::makedev(7, i.into()),
            )
            .unwrap();
        }
        Resolver::new(ResolverConfig {
            sysfs_root: sys,
            dev_root: dev,
            vhost_user_store: None,
        })
        .unwrap()
    }

    fn spec(devs: &[(&str, u32)]) -> oci_spec::runtime::Spec {
        let list: Vec<String> = devs
            .iter()
            .map(|(p, m)| format!(r#"{{"path":"{p}","type":"b","major":7,"minor":{m}}}"#))
            .collect();
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","linux":{{"devices":[{}]}}}}"#,
            list.join(",")
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn attach_rolls_back_on_failure_and_counts_shared_devices() {
        let dir = tempfile::tempdir().unwrap();
        let resolver = host(dir.path(), 3);
        let backend = Arc::new(RecordingBackend::new());
        let mgr = DeviceManager::new(
            ManagerConfig::new(BlockDriver::VirtioScsi, 6..32),
            backend.clone(),
            NullStore,
        )
        .unwrap();
        // The third device fails in the hypervisor: the first two go again.
        backend.fail_on(BackendOp::Hotplug, Some("dev2"));
        let e = attach_all(
            &mgr,
            &resolver,
            &spec(&[("/dev/a", 0), ("/dev/b", 1), ("/dev/c", 2)]),
        )
        .await
        .unwrap_err();
        assert!(e.message.starts_with("capsule: device"), "{e}");
        assert!(backend.plugged().is_empty(), "{:?}", backend.plugged());
        assert!(mgr.is_empty());
        assert!(backend.anomalies().is_empty(), "{:?}", backend.anomalies());

        // Two containers share /dev/loop0: plugged once, unplugged with the
        // last user.
        backend.clear_failures();
        let a = attach_all(&mgr, &resolver, &spec(&[("/dev/a", 0)]))
            .await
            .unwrap();
        let b = attach_all(&mgr, &resolver, &spec(&[("/dev/a", 0)]))
            .await
            .unwrap();
        assert_eq!(a[0].id, b[0].id);
        assert_eq!(backend.plugged().len(), 1);
        detach_all(&mgr, &a).await.unwrap();
        assert_eq!(backend.plugged().len(), 1);
        detach_all(&mgr, &b).await.unwrap();
        assert!(backend.plugged().is_empty());
        assert!(mgr.is_empty());

        // A node that is not there is refused with a readable message.
        let e = attach_all(&mgr, &resolver, &spec(&[("/dev/x", 9)]))
            .await
            .unwrap_err();
        assert!(e.message.contains("/dev/x (b 7:9)"), "{e}");
    }
}
