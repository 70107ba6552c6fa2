//! Host mounts: container rootfs, bind mounts into the sandbox share, and
//! finding/removing what is mounted under a directory.
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Error, Result};

/// One mount of `CreateTaskRequest.rootfs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Mounts `mounts` on `target` in order (overlay, bind, ...), like runc's
/// shim. Long overlay option lists are handled by containerd-shim's helper.
pub fn mount_rootfs(mounts: &[RootfsMount], target: &Path) -> Result<()> {
    std::fs::create_dir_all(target)
        .map_err(|e| crate::error::io(format!("creating {}", target.display()), e))?;
    for (i, m) in mounts.iter().enumerate() {
        let fs_type = Some(m.fs_type.as_str()).filter(|s| !s.is_empty());
        let source = Some(m.source.as_str()).filter(|s| !s.is_empty());
        if let Err(e) = containerd_shim::mount::mount_rootfs(fs_type, source, &m.options, target) {
            // Undo the earlier layers of this rootfs.
            for _ in 0..i {
                let _ = umount2(target, MntFlags::MNT_DETACH);
            }
            return Err(Error::internal(format!(
                "mounting the rootfs ({} {}) on {}: {e}",
                m.fs_type,
                m.source,
                target.display()
            )));
        }
    }
    Ok(())
}

/// Bind-mounts `src` (file or directory) on `dst`, creating `dst`;
/// read-only when asked.
pub fn bind(src: &Path, dst: &Path, read_only: bool) -> Result<()> {
    let what = || format!("bind-mounting {} on {}", src.display(), dst.display());
    let meta = std::fs::metadata(src).map_err(|e| crate::error::io(what(), e))?;
    if meta.is_dir() {
        std::fs::create_dir_all(dst).map_err(|e| crate::error::io(what(), e))?;
    } else {
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| crate::error::io(what(), e))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dst)
            .map_err(|e| crate::error::io(what(), e))?;
    }
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| Error::internal(format!("{}: {e}", what())))?;
    if read_only {
        if let Err(e) = mount(
            None::<&str>,
            dst,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            let _ = umount2(dst, MntFlags::MNT_DETACH);
            return Err(Error::internal(format!(
                "{} (read-only remount): {e}",
                what()
            )));
        }
    }
    Ok(())
}

/// Makes `dir` a mount point of its own with shared propagation, so mounts
/// made under it later reach virtiofsd's mount namespace (a slave copy).
pub fn make_shared_mountpoint(dir: &Path) -> Result<()> {
    let what = |e: nix::Error| {
        Error::internal(format!(
            "making {} a shared mount point: {e}",
            dir.display()
        ))
    };
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(what)?;
    if let Err(e) = mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    ) {
        let _ = umount2(dir, MntFlags::MNT_DETACH);
        return Err(what(e));
    }
    Ok(())
}

/// Unescapes the octal escapes of a mountinfo path (`\040` = space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points listed in a mountinfo text, in file order.
pub fn parse_mountinfo(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// This process's mount points.
pub fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

pub fn is_mount_point(path: &Path) -> bool {
    mount_points().iter().any(|m| m == path)
}

/// Mount points at or under `prefix`, deepest (latest) first, as unmounting
/// needs them.
pub fn mounts_under(points: &[PathBuf], prefix: &Path) -> Vec<PathBuf> {
    let mut v: Vec<(usize, PathBuf)> = points
        .iter()
        .enumerate()
        .filter(|(_, m)| m.starts_with(prefix))
        .map(|(i, m)| (i, m.clone()))
        .collect();
    // Later mounts first (they may sit on earlier ones), then deeper paths.
    v.sort_by(|a, b| {
        b.1.components()
            .count()
            .cmp(&a.1.components().count())
            .then(b.0.cmp(&a.0))
    });
    v.into_iter().map(|(_, m)| m).collect()
}

/// Lazily unmounts everything at or under `prefix` (also stacked mounts on
/// one point). Returns what failed, if anything.
pub fn unmount_under(prefix: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    // Stacked mounts need several rounds; bounded in case one cannot go.
    for _ in 0..8 {
        let targets = mounts_under(&mount_points(), prefix);
        if targets.is_empty() {
            return errors;
        }
        errors.clear();
        for t in &targets {
            if let Err(e) = umount2(t, MntFlags::MNT_DETACH) {
                if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                    errors.push(format!("unmounting {}: {e}", t.display()));
                }
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:40 / /run/capsule/sandboxes/s1/shared rw shared:7 - tmpfs tmpfs rw
41 40 0:41 / /run/capsule/sandboxes/s1/shared/c1/rootfs rw shared:7 - overlay overlay rw
42 22 0:42 / /run/b\\040dir/rootfs rw - overlay overlay rw
43 40 0:43 / /run/capsule/sandboxes/s1/shared/c1/rootfs rw - overlay overlay rw
44 22 0:44 / /run/capsule/sandboxes/s10 rw - tmpfs tmpfs rw
";

    #[test]
    fn mountinfo_parsing_and_order() {
        let points = parse_mountinfo(INFO);
        assert_eq!(points.len(), 6);
        assert_eq!(points[3], PathBuf::from("/run/b dir/rootfs"));
        let under = mounts_under(&points, Path::new("/run/capsule/sandboxes/s1"));
        assert_eq!(
            under,
            vec![
                PathBuf::from("/run/capsule/sandboxes/s1/shared/c1/rootfs"),
                PathBuf::from("/run/capsule/sandboxes/s1/shared/c1/rootfs"),
                PathBuf::from("/run/capsule/sandboxes/s1/shared"),
            ]
        );
        // s10 is not under s1.
        assert!(!under.iter().any(|p| p.ends_with("s10")));
    }
}
