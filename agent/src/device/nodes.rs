//! Device nodes in a container's /dev: mknod + chown + chmod, never through
//! a symlink that leaves the container root.
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{
    fchmodat, fstatat, makedev, mkdirat, mknodat, FchmodatFlags, FileStat, Mode, SFlag,
};
use nix::unistd::{fchownat, unlinkat, Gid, Uid, UnlinkatFlags};

use super::{DeviceError, PreparedDevice};

/// The kind of node to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeType {
    Block,
    Char,
    Fifo,
}

impl NodeType {
    /// From an OCI/request `dev_type`: "b", "c"/"u", "p".
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "b" => Some(Self::Block),
            "c" | "u" => Some(Self::Char),
            "p" => Some(Self::Fifo),
            _ => None,
        }
    }
    fn sflag(self) -> SFlag {
        match self {
            Self::Block => SFlag::S_IFBLK,
            Self::Char => SFlag::S_IFCHR,
            Self::Fifo => SFlag::S_IFIFO,
        }
    }
}

/// The components of an absolute container path with no `..`, `.` or empty
/// names, e.g. `/dev/xvdb` -> `["dev", "xvdb"]`.
pub fn container_components(path: &str) -> Result<Vec<&str>, String> {
    if !path.starts_with('/') {
        return Err(format!("container path {path:?} is not absolute"));
    }
    if path.contains('\0') {
        return Err(format!("container path {path:?} contains NUL"));
    }
    let mut out = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n.to_str().unwrap_or_default()),
            Component::ParentDir => return Err(format!("container path {path:?} contains '..'")),
            Component::CurDir | Component::Prefix(_) => {
                return Err(format!("container path {path:?} is not normalized"))
            }
        }
    }
    if out.is_empty() {
        return Err(format!("container path {path:?} names no file"));
    }
    Ok(out)
}

/// The normalized form of a container path (for duplicate detection).
pub fn normalize(path: &str) -> Result<PathBuf, String> {
    Ok(Path::new("/").join(container_components(path)?.join("/")))
}

fn st_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Checks that `path` is a node of the given type and numbers (the guest's
/// own node, made by devtmpfs): a stale node with other numbers does not count.
pub fn check_node(path: &Path, block: bool, major: u32, minor: u32) -> Result<(), String> {
    let st = nix::sys::stat::lstat(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let want = if block {
        SFlag::S_IFBLK
    } else {
        SFlag::S_IFCHR
    };
    if st_type(&st) != want || st.st_rdev != makedev(major.into(), minor.into()) {
        return Err(format!(
            "{} is not the {} device {major}:{minor} (yet)",
            path.display(),
            if block { "block" } else { "char" }
        ));
    }
    Ok(())
}

fn node_err(p: &PreparedDevice, what: String) -> DeviceError {
    DeviceError::Node {
        device: super::describe(&p.device),
        path: p.device.container_path.clone(),
        reason: what,
    }
}

/// Opens (creating 0755 directories as needed) the directory `parents`
/// below `root`. Symlinks may be followed only while they stay below root
/// (`RESOLVE_BENEATH`; an absolute symlink counts as leaving).
fn open_parent(root: &OwnedFd, parents: &[&str]) -> Result<OwnedFd, String> {
    let how = || {
        OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    let mut cur = openat(
        root,
        ".",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("container root: {e}"))?;
    for i in 0..parents.len() {
        let prefix = parents[..=i].join("/");
        let open = || match openat2(root, prefix.as_str(), how()) {
            // Kernels before 5.6: walk without following any symlink.
            Err(Errno::ENOSYS) => openat(
                &cur,
                parents[i],
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ),
            r => r,
        };
        let next = match open() {
            Err(Errno::ENOENT) => {
                match mkdirat(&cur, parents[i], Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(format!("mkdir /{prefix}: {e}")),
                }
                open()
            }
            r => r,
        };
        cur = match next {
            Ok(fd) => fd,
            Err(Errno::EXDEV) | Err(Errno::ELOOP) => {
                return Err(format!(
                    "/{prefix} is a symlink leading outside the container root"
                ))
            }
            Err(Errno::ENOTDIR) => return Err(format!("/{prefix} is not a directory")),
            Err(e) => return Err(format!("open /{prefix}: {e}")),
        };
    }
    Ok(cur)
}

/// Creates one node: replaces an existing device node (never anything else),
/// then mknod, chown and chmod (explicit, so the umask does not matter).
fn create_one(root: &OwnedFd, p: &PreparedDevice) -> Result<(), DeviceError> {
    let d = &p.device;
    let comps = container_components(&d.container_path).map_err(|e| node_err(p, e))?;
    let (leaf, parents) = comps
        .split_last()
        .ok_or_else(|| node_err(p, "empty path".into()))?;
    let ty = NodeType::parse(&d.dev_type)
        .ok_or_else(|| node_err(p, format!("unknown device type {:?}", d.dev_type)))?;
    let dir = open_parent(root, parents).map_err(|e| node_err(p, e))?;
    match fstatat(&dir, *leaf, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if matches!(st_type(&st), SFlag::S_IFBLK | SFlag::S_IFCHR) => {
            unlinkat(&dir, *leaf, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| node_err(p, format!("removing the old node: {e}")))?;
        }
        Ok(st) => {
            return Err(node_err(
                p,
                format!("exists and is not a device node (mode {:o})", st.st_mode),
            ));
        }
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(node_err(p, format!("stat: {e}"))),
    }
    let mode = if d.file_mode == 0 {
        0o666
    } else {
        d.file_mode & 0o7777
    };
    let rdev = match ty {
        NodeType::Fifo => 0,
        _ => makedev(p.guest_major.into(), p.guest_minor.into()),
    };
    mknodat(
        &dir,
        *leaf,
        ty.sflag(),
        Mode::from_bits_truncate(0o600),
        rdev,
    )
    .map_err(|e| node_err(p, format!("mknod: {e}")))?;
    fchownat(
        &dir,
        *leaf,
        Some(Uid::from_raw(d.uid)),
        Some(Gid::from_raw(d.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| node_err(p, format!("chown {}:{}: {e}", d.uid, d.gid)))?;
    // chown clears setuid/setgid bits, so chmod comes last. The libc does a
    // no-follow chmod through /proc/self/fd; without /proc it fails with
    // EOPNOTSUPP: then check the entry is still our node and chmod it.
    let perm = Mode::from_bits_truncate(mode);
    match fchmodat(&dir, *leaf, perm, FchmodatFlags::NoFollowSymlink) {
        Ok(()) => {}
        Err(Errno::EOPNOTSUPP) => {
            let st = fstatat(&dir, *leaf, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| node_err(p, format!("stat after mknod: {e}")))?;
            if st_type(&st) != ty.sflag() || st.st_rdev != rdev {
                return Err(node_err(p, "the new node was replaced before chmod".into()));
            }
            fchmodat(&dir, *leaf, perm, FchmodatFlags::FollowSymlink)
                .map_err(|e| node_err(p, format!("chmod {mode:o}: {e}")))?;
        }
        Err(e) => return Err(node_err(p, format!("chmod {mode:o}: {e}"))),
    }
    Ok(())
}

/// See [`super::create_nodes`].
pub fn create_nodes(container_root: &Path, prepared: &[PreparedDevice]) -> Result<(), DeviceError> {
    let root = openat(
        nix::fcntl::AT_FDCWD,
        container_root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| DeviceError::ContainerRoot {
        path: container_root.display().to_string(),
        reason: e.to_string(),
    })?;
    prepared.iter().try_for_each(|p| create_one(&root, p))
}
