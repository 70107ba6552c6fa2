//! Paths inside a container root and guest-wide path conventions.
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Where the sandbox's virtio-fs share is mounted in the guest. A relative
/// `CreateContainerRequest.rootfs` (and a relative bind-mount source) is
/// resolved against it. The shim mounts the share there with a `virtiofs`
/// Storage in `CreateSandbox` (tag `capsule-shared` by convention).
pub const SHARED_DIR: &str = "/run/capsule/shared";

/// Parent of the per-container cgroups: `/sys/fs/cgroup/capsule/<cid>`.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
pub const CGROUP_PARENT: &str = "capsule";

/// Symlinks followed before giving up (like the kernel's ELOOP limit).
const MAX_LINKS: usize = 255;

/// Joins `unsafe_path` to `root` so the result stays under `root`, resolving
/// symlinks as if `root` were `/` (an absolute link target restarts at `root`,
/// `..` stops at `root`). Components that do not exist yet are kept as they
/// are, so the result can be created. Like `filepath-securejoin`: it is only
/// as safe as the tree is stable while it runs (the container is not running
/// yet when it matters).
pub fn secure_join(root: &Path, unsafe_path: &Path) -> io::Result<PathBuf> {
    let mut queue: VecDeque<OsString> = components(unsafe_path);
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(part) = queue.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        let full = root.join(&candidate);
        match std::fs::symlink_metadata(&full) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::other(format!(
                        "too many symlinks resolving {} under {}",
                        unsafe_path.display(),
                        root.display()
                    )));
                }
                let target = std::fs::read_link(&full)?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                let mut next = components(&target);
                next.extend(queue);
                queue = next;
            }
            Ok(_) => resolved = candidate,
            Err(e) if e.kind() == io::ErrorKind::NotFound => resolved = candidate,
            Err(e) => return Err(e),
        }
    }
    Ok(root.join(resolved))
}

fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// A relative path with no `..`, no root and at least one component: safe to
/// join under a directory without resolving anything.
pub fn is_plain_relative(p: &Path) -> bool {
    !p.as_os_str().is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && p.components().any(|c| matches!(c, Component::Normal(_)))
}

/// An absolute path with no `..` components.
pub fn is_clean_absolute(p: &Path) -> bool {
    p.is_absolute() && !p.components().any(|c| matches!(c, Component::ParentDir))
}

/// Container and exec ids: what runc accepts, so they are safe as file and
/// cgroup names.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'+'))
}

pub fn cgroup_dir(cid: &str) -> PathBuf {
    Path::new(CGROUP_ROOT).join(CGROUP_PARENT).join(cid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn secure_join_stays_inside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/etc", root.join("abs")).unwrap();
        symlink("../../../..", root.join("etc/up")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        let j = |p: &str| secure_join(root, Path::new(p)).unwrap();
        assert_eq!(j("/etc/hosts"), root.join("etc/hosts"));
        assert_eq!(j("abs/passwd"), root.join("etc/passwd"));
        assert_eq!(j("/../../x"), root.join("x"));
        assert_eq!(j("etc/up/x"), root.join("x"));
        assert_eq!(j("/"), root.to_path_buf());
        assert_eq!(j("new/dir"), root.join("new/dir"));
        assert!(secure_join(root, Path::new("loop1/x")).is_err());
    }

    #[test]
    fn path_predicates() {
        assert!(is_plain_relative(Path::new("c1/rootfs")));
        assert!(!is_plain_relative(Path::new("../x")));
        assert!(!is_plain_relative(Path::new("/x")));
        assert!(!is_plain_relative(Path::new("")));
        assert!(!is_plain_relative(Path::new(".")));
        assert!(is_clean_absolute(Path::new("/dev/xvdb")));
        assert!(!is_clean_absolute(Path::new("/dev/../etc")));
        assert!(!is_clean_absolute(Path::new("dev")));
        assert!(valid_id("c1-abc_0.1"));
        assert!(!valid_id(""));
        assert!(!valid_id("../x"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(".hidden"));
        assert!(!valid_id(&"x".repeat(129)));
    }
}
