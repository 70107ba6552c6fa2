//! Privileged containers get every device of the guest.
//!
//! containerd marks a privileged container with the allow-all device rule
//! (`{"allow": true, "access": "rwm"}`, no type or numbers) and lists the
//! *host's* /dev in `linux.devices`. Those numbers mean nothing in the VM
//! (they would name the guest's own disks), so the shim leaves them out and
//! the agent fills the container's /dev from the guest's devtmpfs instead,
//! with the same rules containerd uses for the host's /dev: no pts, shm,
//! mqueue, fd directories, no console, only device nodes, and nothing that
//! is already there (the standard nodes, the spec's and the device
//! module's devices, the `ptmx` link).
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{mknod, Mode, SFlag};
use oci_spec::runtime::{LinuxDeviceType, Spec};

/// True when the spec's device cgroup rules allow every device.
pub fn is_privileged(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().as_ref())
        .is_some_and(|rules| {
            rules.iter().any(|d| {
                d.allow()
                    && matches!(d.typ(), None | Some(LinuxDeviceType::A))
                    && d.major().is_none()
                    && d.minor().is_none()
                    && d.access().as_deref() == Some("rwm")
            })
        })
}

/// Directories and names of `/dev` that are never copied (containerd's
/// `HostDevices` skips the same).
fn skipped(name: &str, is_dir: bool) -> bool {
    if is_dir {
        return matches!(
            name,
            "pts" | "shm" | "fd" | "mqueue" | ".lxc" | ".lxd-mounts" | ".udev"
        );
    }
    matches!(name, "console" | "ptmx")
}

/// Makes a node in `to` for every character and block device under `from`
/// (recursively), with the same numbers, permission bits and owner; paths
/// that exist in `to` are left alone. Returns how many nodes were made.
pub fn copy_device_nodes(from: &Path, to: &Path) -> Result<usize, String> {
    copy_dir(from, to, 0)
}

fn copy_dir(from: &Path, to: &Path, depth: usize) -> Result<usize, String> {
    if depth > 8 {
        return Ok(0);
    }
    let entries =
        fs::read_dir(from).map_err(|e| format!("guest devices: read {}: {e}", from.display()))?;
    let mut made = 0;
    for entry in entries {
        let entry = entry.map_err(|e| format!("guest devices: read {}: {e}", from.display()))?;
        let name = entry.file_name();
        let Some(name_str) = name.to_str() else {
            continue;
        };
        let src = entry.path();
        // No symlinks followed: a link is not a device node.
        let meta = fs::symlink_metadata(&src)
            .map_err(|e| format!("guest devices: {}: {e}", src.display()))?;
        let ft = meta.file_type();
        let dst = to.join(&name);
        if ft.is_dir() {
            if skipped(name_str, true) {
                continue;
            }
            made += copy_dir(&src, &dst, depth + 1)?;
            continue;
        }
        let kind = if ft.is_char_device() {
            SFlag::S_IFCHR
        } else if ft.is_block_device() {
            SFlag::S_IFBLK
        } else {
            continue;
        };
        if skipped(name_str, false) || dst.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| format!("guest devices: create {}: {e}", parent.display()))?;
        }
        let perm = meta.permissions().mode() & 0o7777;
        mknod(&dst, kind, Mode::from_bits_truncate(perm), meta.rdev())
            .map_err(|e| format!("guest devices: mknod {}: {}", dst.display(), e.desc()))?;
        nix::unistd::chown(
            &dst,
            Some(nix::unistd::Uid::from_raw(meta.uid())),
            Some(nix::unistd::Gid::from_raw(meta.gid())),
        )
        .map_err(|e| format!("guest devices: chown {}: {}", dst.display(), e.desc()))?;
        // mknod applies the umask; set the guest node's bits exactly.
        fs::set_permissions(&dst, fs::Permissions::from_mode(perm))
            .map_err(|e| format!("guest devices: chmod {}: {e}", dst.display()))?;
        made += 1;
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::makedev;

    fn spec(devices: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"r"}},"linux":{{"resources":{{"devices":{devices}}}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn allow_all_rule_means_privileged() {
        // containerd: deny all, then the privileged allow-all.
        assert!(is_privileged(&spec(
            r#"[{"allow":false,"access":"rwm"},{"allow":true,"access":"rwm"}]"#
        )));
        assert!(is_privileged(&spec(
            r#"[{"allow":true,"type":"a","access":"rwm"}]"#
        )));
        for not in [
            r#"[{"allow":false,"access":"rwm"}]"#,
            r#"[{"allow":true,"type":"c","access":"rwm"}]"#,
            r#"[{"allow":true,"major":1,"access":"rwm"}]"#,
            r#"[{"allow":true,"access":"rw"}]"#,
            "[]",
        ] {
            assert!(!is_privileged(&spec(not)), "{not}");
        }
        let none: Spec =
            serde_json::from_str(r#"{"ociVersion":"1.0.2","root":{"path":"r"}}"#).unwrap();
        assert!(!is_privileged(&none));
    }

    /// Needs root (mknod), as the agent's tests do.
    #[test]
    fn copies_nodes_but_not_links_skipped_names_or_existing_paths() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let f = from.path();
        let node = |p: &str, kind: SFlag, maj: u64, min: u64, mode: u32| {
            let path = f.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            mknod(
                &path,
                kind,
                Mode::from_bits_truncate(mode),
                makedev(maj, min),
            )
            .unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        };
        node("null", SFlag::S_IFCHR, 1, 3, 0o666);
        node("vdb", SFlag::S_IFBLK, 254, 16, 0o660);
        node("net/tun", SFlag::S_IFCHR, 10, 200, 0o666);
        node("console", SFlag::S_IFCHR, 5, 1, 0o600);
        node("pts/0", SFlag::S_IFCHR, 136, 0, 0o620);
        node("kmsg", SFlag::S_IFCHR, 1, 11, 0o644);
        std::os::unix::fs::symlink("/proc/self/fd", f.join("fd")).unwrap();
        fs::write(f.join("regular"), b"x").unwrap();
        // Already in the container: kept as it is.
        fs::write(to.path().join("kmsg"), b"mine").unwrap();
        let n = copy_device_nodes(f, to.path()).unwrap();
        assert_eq!(n, 3);
        let t = to.path();
        let m = fs::metadata(t.join("vdb")).unwrap();
        assert!(m.file_type().is_block_device());
        assert_eq!(m.rdev(), makedev(254, 16));
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
        assert_eq!(
            fs::metadata(t.join("net/tun")).unwrap().rdev(),
            makedev(10, 200)
        );
        assert!(fs::metadata(t.join("null"))
            .unwrap()
            .file_type()
            .is_char_device());
        for absent in ["console", "pts", "fd", "regular"] {
            assert!(t.join(absent).symlink_metadata().is_err(), "{absent}");
        }
        assert_eq!(fs::read(t.join("kmsg")).unwrap(), b"mine");
    }
}
