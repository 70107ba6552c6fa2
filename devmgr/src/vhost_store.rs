//! The vhost-user store: block nodes standing for vhost-user backends.
//!
//! Layout (all plain directories, no symlinks anywhere):
//! ```text
//! <store>/block/devices/<name>   block node created with mknod, b 241:N or b 242:N
//! <store>/block/sockets/<name>   the backend's unix socket, same file name
//! ```
//! Only **block** requests are looked up here: major 241 is vhost-user-blk,
//! major 242 vhost-user-scsi. Char devices with those majors (Intel QAT's
//! `/dev/qat_adf_ctl` is `c 241:0`) are never vhost-user. While the store is
//! enabled a `b 241:*`/`b 242:*` request that is not in the store is an error,
//! never an ordinary block device. Symlinks are skipped (device entries) or
//! rejected (directories, sockets), and every path found is canonicalized and
//! checked to be inside the store.
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::device::{DevType, DeviceInfo, DeviceKind, HostDevice, VhostUserKind};
pub use crate::resolve::ResolveError;
use crate::resolve::{describe, file_kind, is_missing, rdev_of};

/// Block major standing for vhost-user-blk devices.
pub const VHOST_USER_BLK_MAJOR: u32 = 241;
/// Block major standing for vhost-user-scsi devices.
pub const VHOST_USER_SCSI_MAJOR: u32 = 242;

/// The vhost-user kind a request stands for, if any: only block devices
/// with major 241 or 242.
pub fn vhost_kind(info: &DeviceInfo) -> Option<VhostUserKind> {
    match (info.dev_type, info.major) {
        (DevType::Block, VHOST_USER_BLK_MAJOR) => Some(VhostUserKind::Blk),
        (DevType::Block, VHOST_USER_SCSI_MAJOR) => Some(VhostUserKind::Scsi),
        _ => None,
    }
}

/// Finds `info` in the store at `store`. `info` must be a vhost-user request
/// (see [`vhost_kind`]); anything else is an error.
pub fn lookup(store: &Path, info: &DeviceInfo) -> Result<HostDevice, ResolveError> {
    let dev = describe(info);
    let err = |reason: String| ResolveError::VhostStore {
        device: dev.clone(),
        store: store.to_path_buf(),
        reason,
    };
    let vhost = vhost_kind(info).ok_or_else(|| {
        err(format!(
            "only block devices with major {VHOST_USER_BLK_MAJOR} or {VHOST_USER_SCSI_MAJOR} are vhost-user devices"
        ))
    })?;
    let rdev =
        rdev_of(info.major, info.minor).ok_or_else(|| err("device number out of range".into()))?;
    let canon = fs::canonicalize(store).map_err(|e| err(format!("cannot open the store: {e}")))?;
    for sub in ["block", "block/devices", "block/sockets"] {
        check_plain_dir(&canon.join(sub)).map_err(|why| err(format!("{sub}: {why}")))?;
    }
    let name = find_node(&canon.join("block/devices"), rdev, &dev)
        .map_err(|why| err(format!("block/devices: {why}")))?
        .ok_or_else(|| {
            err(format!(
                "no block node {}:{} in block/devices (while the store is enabled, majors \
                 {VHOST_USER_BLK_MAJOR}/{VHOST_USER_SCSI_MAJOR} are not resolved as ordinary block devices)",
                info.major, info.minor
            ))
        })?;
    let node = Path::new("block/devices").join(&name);
    let socket = Path::new("block/sockets").join(&name);
    check_inside(&canon, &node).map_err(&err)?;
    check_socket(&canon.join(&socket))
        .map_err(|why| err(format!("{}: {why}", socket.display())))?;
    check_inside(&canon, &socket).map_err(&err)?;
    tracing::debug!(device = %dev, store = %store.display(), node = %node.display(), "resolved vhost-user device");
    Ok(HostDevice {
        info: Some(info.clone()),
        host_path: store.join(&node),
        kind: DeviceKind::VhostUser {
            vhost,
            socket: store.join(&socket),
            tag: String::new(),
        },
    })
}

/// `path` must be a directory, not a symlink to one.
fn check_plain_dir(path: &Path) -> Result<(), String> {
    let meta = fs::symlink_metadata(path).map_err(|e| match is_missing(&e) {
        true => "missing".to_owned(),
        false => format!("cannot stat: {e}"),
    })?;
    if !meta.file_type().is_dir() {
        return Err(format!("is a {}, not a directory", file_kind(&meta)));
    }
    Ok(())
}

/// Scans `dir` for the one block node with `rdev`. Entries that cannot be
/// read and symlinks are logged and skipped; two matches are an error.
fn find_node(dir: &Path, rdev: u64, dev: &str) -> Result<Option<std::ffi::OsString>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list: {e}"))?;
    let mut found: Vec<std::ffi::OsString> = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(device = %dev, dir = %dir.display(), error = %e, "skipping unreadable vhost-user store entry");
                continue;
            }
        };
        if node_matches(&entry.path(), rdev, dev) {
            found.push(entry.file_name());
        }
    }
    found.sort();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        many => Err(format!(
            "{} nodes have this number: {}",
            many.len(),
            many.iter()
                .map(|n| n.to_string_lossy())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// True when `path` (not followed) is a block node with `rdev`.
fn node_matches(path: &Path, rdev: u64, dev: &str) -> bool {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(device = %dev, path = %path.display(), error = %e, "skipping vhost-user store entry");
            return false;
        }
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        tracing::warn!(device = %dev, path = %path.display(), "skipping symlink in the vhost-user store");
        return false;
    }
    ft.is_block_device() && meta.rdev() == rdev
}

/// `path` must be a unix socket, not a symlink to one.
fn check_socket(path: &Path) -> Result<(), String> {
    let meta = fs::symlink_metadata(path).map_err(|e| match is_missing(&e) {
        true => "socket is missing".to_owned(),
        false => format!("cannot stat the socket: {e}"),
    })?;
    if !meta.file_type().is_socket() {
        return Err(format!("is a {}, not a unix socket", file_kind(&meta)));
    }
    Ok(())
}

/// The canonical form of `canon/rel` must stay inside `canon`.
fn check_inside(canon: &Path, rel: &Path) -> Result<(), String> {
    let full: PathBuf = canon.join(rel);
    let real = fs::canonicalize(&full).map_err(|e: io::Error| format!("{}: {e}", rel.display()))?;
    if !real.starts_with(canon) {
        return Err(format!(
            "{} resolves outside the store, to {}",
            rel.display(),
            real.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(dev_type: DevType, major: u32) -> DeviceInfo {
        DeviceInfo::new("/dev/x", dev_type, major, 0)
    }

    #[test]
    fn only_block_241_and_242_are_vhost_user() {
        assert_eq!(
            vhost_kind(&info(DevType::Block, 241)),
            Some(VhostUserKind::Blk)
        );
        assert_eq!(
            vhost_kind(&info(DevType::Block, 242)),
            Some(VhostUserKind::Scsi)
        );
        assert_eq!(vhost_kind(&info(DevType::Char, 241)), None);
        assert_eq!(vhost_kind(&info(DevType::CharUnbuffered, 242)), None);
        assert_eq!(vhost_kind(&info(DevType::Block, 8)), None);
    }

    #[test]
    fn lookup_refuses_non_vhost_requests() {
        let e = lookup(Path::new("/nonexistent"), &info(DevType::Char, 241)).unwrap_err();
        assert!(e.to_string().contains("only block devices"), "{e}");
    }

    #[test]
    fn missing_store_is_a_clear_error() {
        let e = lookup(
            Path::new("/nonexistent/capsule-store"),
            &info(DevType::Block, 241),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/dev/x (b 241:0)") && msg.contains("/nonexistent/capsule-store"),
            "{msg}"
        );
    }
}
