//! Host mounts: container rootfs, bind mounts into the sandbox share, and
//! finding/removing what is mounted under a directory.
//!
//! The share is visible to the guest, which may plant symlinks in it: a
//! mount point inside it is created and mounted on without following any
//! symlink (each component opened with `O_NOFOLLOW` below the share's own
//! directory, the mount made on `/proc/self/fd/N` of the opened target),
//! and unmounts never follow one.
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{openat, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{mkdirat, Mode};

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

/// Opens (creating it) the directory `rel` below `root`, never following
/// a symlink: every component is opened with `O_NOFOLLOW` relative to the
/// one before.
fn open_dir_below(root: &Path, rel: &Path, what: &dyn Fn() -> String) -> Result<OwnedFd> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let sys = |op: &str, e: nix::Error| {
        crate::error::io(format!("{}: {op}", what()), std::io::Error::from(e))
    };
    let mut dir = openat(
        nix::fcntl::AT_FDCWD,
        root,
        flags | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(|e| sys(&format!("opening {}", root.display()), e))?;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(Error::invalid(format!(
                "{}: {} is not a plain relative path",
                what(),
                rel.display()
            )));
        };
        match mkdirat(&dir, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(sys(&format!("creating {}", name.to_string_lossy()), e)),
        }
        dir = openat(&dir, name, flags | OFlag::O_RDONLY, Mode::empty()).map_err(|e| {
            sys(
                &format!(
                    "opening {} (a symlink is never followed)",
                    name.to_string_lossy()
                ),
                e,
            )
        })?;
    }
    Ok(dir)
}

/// The path that reaches what `fd` refers to without any lookup.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// How a bind into the share follows mounts made under its source later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// A peer of the source (slave in virtiofsd's namespace): later mounts
    /// under the source reach the VM (`rslave`, and binds that name none).
    FromHost,
    /// A copy of its own (`rprivate`, Kubernetes' default): later mounts
    /// under the source never reach the VM.
    Private,
}

/// Bind-mounts `src` (file or directory) on `root/rel`, creating the mount
/// point without following a symlink anywhere below `root`; read-only when
/// asked.
pub fn bind_below(
    root: &Path,
    rel: &Path,
    src: &Path,
    read_only: bool,
    propagation: Propagation,
) -> Result<()> {
    let dst = root.join(rel);
    let what = || format!("bind-mounting {} on {}", src.display(), dst.display());
    let meta = std::fs::metadata(src).map_err(|e| crate::error::io(what(), e))?;
    let (parent, name) = match (rel.parent(), rel.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => {
            return Err(Error::invalid(format!(
                "{}: no mount point name in {}",
                what(),
                rel.display()
            )))
        }
    };
    let dir = open_dir_below(root, parent, &what)?;
    let sys = |op: &str, e: nix::Error| {
        crate::error::io(format!("{}: {op}", what()), std::io::Error::from(e))
    };
    let target = if meta.is_dir() {
        match mkdirat(&dir, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(sys("creating the mount point", e)),
        }
        openat(
            &dir,
            name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    } else {
        drop(
            openat(
                &dir,
                name,
                OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| sys("creating the mount point", e))?,
        );
        openat(
            &dir,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    }
    .map_err(|e| sys("opening the mount point (a symlink is never followed)", e))?;
    match propagation {
        Propagation::FromHost => mount(
            Some(src),
            &fd_path(&target),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| sys("mount", e))?,
        Propagation::Private => private_tree(src)
            .and_then(|tree| move_tree(&tree, &target))
            .map_err(|e| crate::error::io(format!("{}: private copy", what()), e))?,
    }
    if read_only {
        // The mount now sits on `name`: open it again to reach the new
        // mount's root, not the directory under it.
        let remount = openat(
            &dir,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .and_then(|m| {
            mount(
                None::<&str>,
                &fd_path(&m),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
        });
        if let Err(e) = remount {
            let _ = umount2(&fd_path(&target), MntFlags::MNT_DETACH);
            let _ = umount2(&dst, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
            return Err(sys("read-only remount", e));
        }
    }
    Ok(())
}

/// A detached recursive copy of the mounts at `src` with private
/// propagation. Attached in the share, it is a mount of its own, not a peer
/// of `src` (the share's shared propagation gives it a new peer group), so
/// what the host mounts under `src` later never reaches the VM.
fn private_tree(src: &Path) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(src.as_os_str().as_bytes())?;
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as u32;
    // SAFETY: open_tree(2) with a NUL-terminated path; it returns a new descriptor or -1 and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("open_tree: bad descriptor"))?;
    // SAFETY: `fd` was just returned by open_tree and nothing else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    let attr = libc::mount_attr {
        attr_set: 0,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(2) on our descriptor with an empty path; `attr` lives across the call and its size is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tree)
}

/// Attaches the detached `tree` on the mount point `target` (opened without
/// following a symlink).
fn move_tree(tree: &OwnedFd, target: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: move_mount(2) between two descriptors we hold, empty paths.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
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
            if let Err(e) = umount2(t, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
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
    fn bind_below_never_follows_a_planted_symlink() {
        let d = tempfile::tempdir().unwrap();
        let share = d.path().join("share");
        let victim = d.path().join("victim");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::create_dir_all(&victim).unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        // The guest planted share/c1 -> victim.
        std::os::unix::fs::symlink(&victim, share.join("c1")).unwrap();
        let e = bind_below(
            &share,
            Path::new("c1/rootfs"),
            &src,
            false,
            Propagation::FromHost,
        )
        .unwrap_err();
        assert!(e.to_string().contains("symlink is never followed"), "{e}");
        assert!(std::fs::read_dir(&victim).unwrap().next().is_none());
        // A symlink as the last component is refused too.
        std::fs::create_dir_all(share.join("c2")).unwrap();
        std::os::unix::fs::symlink(&victim, share.join("c2/rootfs")).unwrap();
        assert!(bind_below(
            &share,
            Path::new("c2/rootfs"),
            &src,
            false,
            Propagation::Private
        )
        .is_err());
        assert!(!is_mount_point(&victim));
        // A plain path works, read-only too, and unmounts.
        bind_below(
            &share,
            Path::new("c3/rootfs"),
            &src,
            true,
            Propagation::FromHost,
        )
        .unwrap();
        let m = share.join("c3/rootfs");
        assert!(is_mount_point(&m));
        assert!(std::fs::write(m.join("g"), "y").is_err(), "read-only");
        assert!(unmount_under(&share.join("c3")).is_empty());
        assert!(!is_mount_point(&m));
        assert!(bind_below(&share, Path::new("../x"), &src, false, Propagation::Private).is_err());
    }

    #[test]
    fn a_private_bind_never_sees_later_host_mounts() {
        let d = tempfile::tempdir().unwrap();
        let share = d.path().join("share");
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::create_dir_all(&share).unwrap();
        // The share is a shared mount point, as the sandbox's is.
        make_shared_mountpoint(&share).unwrap();
        // The source is a shared mount too (a host volume on a shared /).
        make_shared_mountpoint(&src).unwrap();
        bind_below(
            &share,
            Path::new("c1/priv"),
            &src,
            true,
            Propagation::Private,
        )
        .unwrap();
        bind_below(
            &share,
            Path::new("c1/slave"),
            &src,
            false,
            Propagation::FromHost,
        )
        .unwrap();
        let priv_ = share.join("c1/priv");
        assert!(is_mount_point(&priv_));
        assert!(std::fs::write(priv_.join("g"), "y").is_err(), "read-only");
        // The host mounts under the source after the share was made.
        mount(
            Some("tmpfs"),
            &src.join("sub"),
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(src.join("sub/late"), "late").unwrap();
        assert!(share.join("c1/slave/sub/late").exists(), "rslave sees it");
        assert!(!priv_.join("sub/late").exists(), "rprivate never does");
        assert!(unmount_under(&share).is_empty());
        let _ = umount2(&src.join("sub"), MntFlags::MNT_DETACH);
        let _ = umount2(&src, MntFlags::MNT_DETACH);
        let _ = umount2(&share, MntFlags::MNT_DETACH);
    }

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
