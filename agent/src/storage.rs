//! Storages: what CreateSandbox / CreateContainer mount in the guest before
//! containers use them. A virtio-fs share (`driver` "virtiofs", `source` the
//! tag), or a block device found by its guest address through the device
//! module (`driver` "blk-pci", "scsi", "pmem", "vhost-user-blk", "blk-mmio").
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsule_agent_protocol::agent::{Device, DeviceKind, Storage};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::container::spec::parse_mount_options;
use crate::device::{self, DeviceWatcher};
use crate::error::{AgentError, Result};
use crate::paths::is_clean_absolute;

/// How long a storage's block device may take to appear.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(20);

/// What to mount, resolved from a Storage (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Virtiofs { tag: String },
    Block { kind: DeviceKind, address: String },
}

pub fn classify(s: &Storage) -> Result<Source> {
    let what = format!("storage {:?} at {:?}", s.source, s.mount_point);
    if !is_clean_absolute(Path::new(&s.mount_point)) || s.mount_point == "/" {
        return Err(AgentError::invalid(format!(
            "{what}: mount point must be an absolute path other than /"
        )));
    }
    if s.source.is_empty() {
        return Err(AgentError::invalid(format!("{what}: empty source")));
    }
    let kind = match s.driver.as_str() {
        "virtiofs" | "virtio-fs" => {
            if s.source.contains('/') {
                return Err(AgentError::invalid(format!(
                    "{what}: a virtio-fs tag has no '/'"
                )));
            }
            return Ok(Source::Virtiofs {
                tag: s.source.clone(),
            });
        }
        "blk-pci" | "blk" | "virtio-blk" => DeviceKind::DEVICE_KIND_BLK_PCI,
        "scsi" => DeviceKind::DEVICE_KIND_SCSI,
        "pmem" | "nvdimm" => DeviceKind::DEVICE_KIND_PMEM,
        "vhost-user-blk" => DeviceKind::DEVICE_KIND_VHOST_USER_BLK,
        "blk-mmio" => DeviceKind::DEVICE_KIND_BLK_MMIO,
        other => {
            return Err(AgentError::invalid(format!(
                "{what}: unknown driver {other:?}"
            )))
        }
    };
    if s.fstype.is_empty() {
        return Err(AgentError::invalid(format!(
            "{what}: a block storage needs fstype"
        )));
    }
    Ok(Source::Block {
        kind,
        address: s.source.clone(),
    })
}

/// Mounts one storage; returns its mount point.
pub async fn mount_storage(watcher: &DeviceWatcher, s: &Storage) -> Result<PathBuf> {
    let what = format!("storage {:?} at {:?}", s.source, s.mount_point);
    let source = classify(s)?;
    let opts = parse_mount_options(&s.options);
    let data = opts.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    let mp = PathBuf::from(&s.mount_point);
    std::fs::create_dir_all(&mp)
        .map_err(|e| crate::error::io_err(format!("{what}: create mount point"), e))?;
    let r = match &source {
        Source::Virtiofs { tag } => {
            mount(Some(tag.as_str()), &mp, Some("virtiofs"), opts.flags, data)
        }
        Source::Block { kind, address } => {
            let mut d = Device::new();
            d.id = format!("storage:{}", s.mount_point);
            d.kind = (*kind).into();
            d.guest_address = address.clone();
            d.container_path = format!("/dev/capsule-storage{}", s.mount_point.replace('/', "-"));
            d.dev_type = "b".into();
            d.read_only = opts.flags.contains(MsFlags::MS_RDONLY);
            let prepared = device::prepare(watcher, &[d], DEVICE_TIMEOUT)
                .await
                .map_err(|e| AgentError::device(&what, e))?;
            let node = prepared
                .first()
                .map(|p| p.guest_node.clone())
                .ok_or_else(|| {
                    AgentError::Internal(format!("{what}: device module returned nothing"))
                })?;
            mount(Some(&node), &mp, Some(s.fstype.as_str()), opts.flags, data)
        }
    };
    r.map_err(|e| crate::error::sys_err(format!("{what}: mount"), e))?;
    for p in &opts.propagation {
        if let Err(e) = mount(None::<&str>, &mp, None::<&str>, *p, None::<&str>) {
            unmount(&mp);
            return Err(crate::error::sys_err(
                format!("{what}: mount propagation"),
                e,
            ));
        }
    }
    tracing::info!(storage = %s.source, mount_point = %s.mount_point, "storage mounted");
    Ok(mp)
}

/// Mounts several; on failure unmounts the ones done.
pub async fn mount_all(watcher: &DeviceWatcher, storages: &[Storage]) -> Result<Vec<PathBuf>> {
    let mut done = Vec::new();
    for s in storages {
        match mount_storage(watcher, s).await {
            Ok(p) => done.push(p),
            Err(e) => {
                for p in done.iter().rev() {
                    unmount(p);
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Lazily unmounts (busy mounts go when their last user does).
pub fn unmount(p: &Path) {
    match umount2(p, MntFlags::MNT_DETACH) {
        Ok(()) => match std::fs::remove_dir(p) {
            Ok(()) => {}
            // Not ours to remove (a pre-existing directory with content).
            Err(e) => tracing::debug!(mount_point = %p.display(), error = %e, "mount point kept"),
        },
        Err(e) => tracing::warn!(mount_point = %p.display(), error = %e, "unmount failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(driver: &str, source: &str, fstype: &str, mp: &str) -> Storage {
        let mut s = Storage::new();
        s.driver = driver.into();
        s.source = source.into();
        s.fstype = fstype.into();
        s.mount_point = mp.into();
        s
    }

    #[test]
    fn classify_storages() {
        assert_eq!(
            classify(&st("virtiofs", "capsule-shared", "", "/run/capsule/shared")).unwrap(),
            Source::Virtiofs {
                tag: "capsule-shared".into()
            }
        );
        assert_eq!(
            classify(&st("scsi", "0:1", "ext4", "/run/capsule/storage/d1")).unwrap(),
            Source::Block {
                kind: DeviceKind::DEVICE_KIND_SCSI,
                address: "0:1".into()
            }
        );
        for bad in [
            st("virtiofs", "a/b", "", "/x"),
            st("virtiofs", "t", "", "rel"),
            st("virtiofs", "t", "", "/"),
            st("virtiofs", "t", "", "/a/../b"),
            st("blk-pci", "02", "", "/x"),
            st("nfs", "x", "nfs", "/x"),
            st("scsi", "", "ext4", "/x"),
        ] {
            let e = classify(&bad).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{bad:?}");
        }
    }
}
