//! Building a container's root, inside its new mount namespace (runs in the
//! `init-container` child): OCI mounts, /dev, device nodes, hostname,
//! sysctls, then pivot_root (or MS_MOVE + chroot on the initramfs), the
//! read-only root, masked and read-only paths.
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::LinuxDeviceType;
use protobuf::Message;

use super::child::InitConfig;
use super::spec::{mount_plan, MountStep};
use crate::paths::secure_join;

type R<T = ()> = Result<T, String>;

fn m(what: impl std::fmt::Display, r: nix::Result<()>) -> R {
    r.map_err(|e| format!("{what}: {}", e.desc()))
}

pub fn prepare(cfg: &InitConfig) -> R {
    let spec = &cfg.spec;
    let rootfs = cfg.rootfs.as_path();
    nix::sys::stat::umask(Mode::empty());
    m(
        "make / private",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    if !rootfs.is_dir() {
        return Err(format!("rootfs {} is not a directory", rootfs.display()));
    }
    // A mount point of its own, for pivot_root / MS_MOVE.
    m(
        format!("bind rootfs {}", rootfs.display()),
        mount(
            Some(rootfs),
            rootfs,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    let plan =
        mount_plan(&cfg.cid, spec.mounts().as_deref().unwrap_or(&[])).map_err(|e| e.to_string())?;
    for step in &plan {
        apply_mount(rootfs, step)?;
        if step.destination == Path::new("/dev") && !step.is_bind() {
            default_dev(rootfs)?;
        }
    }
    create_devices(cfg)?;
    if cfg.guest_devices {
        let dev = secure_join(rootfs, Path::new("/dev")).map_err(|e| format!("/dev: {e}"))?;
        super::privileged::copy_device_nodes(Path::new("/dev"), &dev)?;
    }
    if cfg.set_hostname {
        if let Some(h) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
            nix::unistd::sethostname(h).map_err(|e| format!("sethostname {h:?}: {}", e.desc()))?;
        }
    }
    let linux = spec.linux().clone().unwrap_or_default();
    for (k, v) in linux.sysctl().iter().flatten() {
        if k.contains('/') || k.contains("..") {
            return Err(format!("sysctl {k:?} is not a sysctl name"));
        }
        let path = Path::new("/proc/sys").join(k.replace('.', "/"));
        fs::write(&path, v).map_err(|e| format!("sysctl {k}={v}: {e}"))?;
    }
    switch_root(rootfs)?;
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        remount(Path::new("/"), MsFlags::MS_RDONLY)
            .map_err(|e| format!("make root read-only: {e}"))?;
    }
    if let Some(p) = linux.rootfs_propagation().as_deref() {
        let flags = super::spec::parse_mount_options(&[p]).propagation;
        for f in flags {
            m(
                format!("rootfs propagation {p}"),
                mount(None::<&str>, "/", None::<&str>, f, None::<&str>),
            )?;
        }
    }
    for p in linux.masked_paths().iter().flatten() {
        mask(Path::new(p))?;
    }
    for p in linux.readonly_paths().iter().flatten() {
        let path = Path::new(p);
        if !path.exists() {
            continue;
        }
        m(
            format!("read-only path {p}"),
            mount(
                Some(path),
                path,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            ),
        )?;
        remount(
            path,
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        )
        .map_err(|e| format!("read-only path {p}: {e}"))?;
    }
    Ok(())
}

fn apply_mount(rootfs: &Path, step: &MountStep) -> R {
    let what = format!("mount {}", step.destination.display());
    let dest = secure_join(rootfs, &step.destination).map_err(|e| format!("{what}: {e}"))?;
    let flags = MsFlags::from_bits_truncate(step.flags);
    let data = (!step.data.is_empty()).then_some(step.data.as_str());
    if step.is_bind() {
        let src = step.source.clone().unwrap_or_default();
        let meta = fs::metadata(&src)
            .map_err(|e| format!("{what}: bind source {}: {e}", src.display()))?;
        make_target(&dest, meta.is_dir()).map_err(|e| format!("{what}: {e}"))?;
        m(
            &what,
            mount(Some(&src), &dest, None::<&str>, flags, None::<&str>),
        )?;
        if let Some(r) = step.remount {
            let extra = MsFlags::from_bits_truncate(r) - (MsFlags::MS_REMOUNT | MsFlags::MS_BIND);
            remount(&dest, extra).map_err(|e| format!("{what}: {e}"))?;
        }
    } else {
        make_target(&dest, true).map_err(|e| format!("{what}: {e}"))?;
        let mut fstype = step.fstype.clone().unwrap_or_default();
        let mut source = step
            .source
            .clone()
            .unwrap_or_else(|| PathBuf::from(&fstype));
        if fstype == "cgroup" || fstype == "cgroup2" {
            // The guest has cgroup v2 only.
            fstype = "cgroup2".into();
            source = "cgroup2".into();
            if let Some(own) = own_cgroup_outside_namespace()? {
                // No cgroup namespace of its own (a cgroup v1 host's
                // containerd asks for none): like runc, the container sees
                // its own cgroup as /sys/fs/cgroup, never the guest's root.
                return bind_own_cgroup(&what, &own, &dest, flags);
            }
        }
        let r = mount(Some(&source), &dest, Some(fstype.as_str()), flags, data);
        // mqueue/sysfs may be refused in some setups; runc falls back to binds.
        if r == Err(Errno::EPERM) && fstype == "sysfs" {
            m(
                &what,
                mount(
                    Some("/sys"),
                    &dest,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                ),
            )?;
        } else {
            m(format!("{what} ({fstype})"), r)?;
        }
    }
    for p in &step.propagation {
        m(
            format!("{what}: propagation"),
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                MsFlags::from_bits_truncate(*p),
                None::<&str>,
            ),
        )?;
    }
    Ok(())
}

/// The guest's directory of this process's cgroup when the process sees
/// it from outside (no cgroup namespace rooted at it): `0::/capsule/<cid>`
/// in /proc/self/cgroup. `None` inside a cgroup namespace (`0::/`).
fn own_cgroup_outside_namespace() -> Result<Option<PathBuf>, String> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("read /proc/self/cgroup: {e}"))?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| format!("/proc/self/cgroup has no cgroup v2 line: {text:?}"))?;
    let rel = path.trim().trim_start_matches('/');
    Ok((!rel.is_empty()).then(|| Path::new("/sys/fs/cgroup").join(rel)))
}

/// Binds the container's own cgroup directory on its /sys/fs/cgroup with
/// the mount's flags (read-only unless privileged).
fn bind_own_cgroup(what: &str, own: &Path, dest: &Path, flags: MsFlags) -> R {
    m(
        format!("{what} (own cgroup {})", own.display()),
        mount(
            Some(own),
            dest,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    )?;
    let extra =
        flags & (MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
    if extra.is_empty() {
        return Ok(());
    }
    remount(dest, extra).map_err(|e| format!("{what}: {e}"))
}

/// Creates the mount point: a directory, or an empty file for file binds.
fn make_target(dest: &Path, dir: bool) -> R {
    if dir {
        return fs::create_dir_all(dest).map_err(|e| format!("create {}: {e}", dest.display()));
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
    }
    if !dest.exists() {
        fs::File::create(dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
    }
    Ok(())
}

/// Remount a bind with `flags`, keeping the flags the kernel locks (an
/// unprivileged-looking EPERM otherwise, e.g. nosuid of the source mount).
fn remount(path: &Path, flags: MsFlags) -> R {
    let base = MsFlags::MS_REMOUNT | MsFlags::MS_BIND;
    match mount(None::<&str>, path, None::<&str>, base | flags, None::<&str>) {
        Ok(()) => Ok(()),
        Err(Errno::EPERM) => {
            let st = nix::sys::statvfs::statvfs(path)
                .map_err(|e| format!("statvfs {}: {}", path.display(), e.desc()))?;
            let mut locked = MsFlags::empty();
            use nix::sys::statvfs::FsFlags;
            for (f, mf) in [
                (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
                (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
                (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
                (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
                (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
                (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
                (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
            ] {
                if st.flags().contains(f) {
                    locked |= mf;
                }
            }
            m(
                format!("remount {}", path.display()),
                mount(
                    None::<&str>,
                    path,
                    None::<&str>,
                    base | flags | locked,
                    None::<&str>,
                ),
            )
        }
        Err(e) => Err(format!("remount {}: {}", path.display(), e.desc())),
    }
}

/// The standard nodes and links of a fresh /dev tmpfs.
fn default_dev(rootfs: &Path) -> R {
    let dev = rootfs.join("dev");
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = dev.join(name);
        if path.exists() {
            continue;
        }
        match mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        ) {
            Ok(()) => {}
            // No mknod allowed: bind the guest's node instead (like runc).
            Err(Errno::EPERM) => {
                fs::File::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
                let host = Path::new("/dev").join(name);
                m(
                    format!("bind {}", host.display()),
                    mount(
                        Some(&host),
                        &path,
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    ),
                )?;
            }
            Err(e) => return Err(format!("mknod {}: {}", path.display(), e.desc())),
        }
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let path = dev.join(name);
        if path.symlink_metadata().is_err() {
            symlink(target, &path).map_err(|e| format!("symlink {}: {e}", path.display()))?;
        }
    }
    for d in ["pts", "shm", "mqueue"] {
        let p = dev.join(d);
        fs::create_dir_all(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
    }
    Ok(())
}

/// After the switch: bind the container's terminal (a slave of its own
/// devpts) onto /dev/console, when /dev is ours.
pub fn bind_console(slave: &Path) -> R {
    let console = Path::new("/dev/console");
    if !Path::new("/dev/pts/ptmx").exists() {
        return Ok(());
    }
    make_target(console, false)?;
    m(
        "bind /dev/console",
        mount(
            Some(slave),
            console,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    )
}

/// Device nodes: those the device module prepared (with guest numbers), then
/// the remaining `linux.devices` of the spec as they are.
fn create_devices(cfg: &InitConfig) -> R {
    let mut prepared = Vec::new();
    for d in &cfg.devices {
        let device = capsule_agent_protocol::agent::Device::parse_from_bytes(&d.device)
            .map_err(|e| format!("device from the agent: {e}"))?;
        prepared.push(crate::device::PreparedDevice {
            device,
            guest_major: d.guest_major,
            guest_minor: d.guest_minor,
            guest_node: d.guest_node.clone(),
        });
    }
    if !prepared.is_empty() {
        crate::device::create_nodes(&cfg.rootfs, &prepared).map_err(|e| e.to_string())?;
    }
    let done: Vec<&str> = prepared
        .iter()
        .map(|p| p.device.container_path.as_str())
        .collect();
    let devices = cfg
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default();
    // /dev/ptmx is the link to the container's own devpts (made above),
    // never a node: runc skips it too (containerd lists the host's for a
    // privileged container).
    for d in devices
        .iter()
        .filter(|d| !done.iter().any(|p| Path::new(p) == d.path()))
        .filter(|d| d.path() != Path::new("/dev/ptmx"))
    {
        let what = format!("device {}", d.path().display());
        let kind = match d.typ() {
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            LinuxDeviceType::A => return Err(format!("{what}: type 'a' is not a node type")),
        };
        let (Ok(major), Ok(minor)) = (u64::try_from(d.major()), u64::try_from(d.minor())) else {
            return Err(format!("{what}: negative major/minor"));
        };
        let path = secure_join(&cfg.rootfs, d.path()).map_err(|e| format!("{what}: {e}"))?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("{what}: {e}"))?;
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{what}: remove {}: {e}", path.display())),
        }
        let mode = Mode::from_bits_truncate(d.file_mode().unwrap_or(0o666));
        mknod(&path, kind, mode, makedev(major, minor))
            .map_err(|e| format!("{what}: mknod: {}", e.desc()))?;
        nix::unistd::chown(
            &path,
            d.uid().map(nix::unistd::Uid::from_raw),
            d.gid().map(nix::unistd::Gid::from_raw),
        )
        .map_err(|e| format!("{what}: chown: {}", e.desc()))?;
        // mknod applied the umask: set the spec's bits exactly.
        fs::set_permissions(&path, fs::Permissions::from_mode(mode.bits()))
            .map_err(|e| format!("{what}: chmod: {e}"))?;
    }
    Ok(())
}

/// pivot_root into `rootfs`; when the current root is the initramfs (where
/// pivot_root is EINVAL), detach the agent's other mounts and MS_MOVE the
/// rootfs onto `/` + chroot, like `runc --no-pivot`.
fn switch_root(rootfs: &Path) -> R {
    nix::unistd::chdir(rootfs).map_err(|e| format!("chdir {}: {}", rootfs.display(), e.desc()))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            m("detach old root", umount2(".", MntFlags::MNT_DETACH))?;
            nix::unistd::chdir("/").map_err(|e| format!("chdir /: {}", e.desc()))?;
            Ok(())
        }
        Err(Errno::EINVAL) => {
            let ancestors = detach_other_mounts(rootfs)?;
            m(
                "move rootfs to /",
                mount(
                    Some(rootfs),
                    "/",
                    None::<&str>,
                    MsFlags::MS_MOVE,
                    None::<&str>,
                ),
            )?;
            // The rootfs no longer hangs below them: detach the rest too
            // (absolute paths still resolve from the old root here).
            for a in ancestors {
                detach(&a)?;
            }
            nix::unistd::chroot(".").map_err(|e| format!("chroot: {}", e.desc()))?;
            nix::unistd::chdir("/").map_err(|e| format!("chdir /: {}", e.desc()))?;
            Ok(())
        }
        Err(e) => Err(format!("pivot_root {}: {}", rootfs.display(), e.desc())),
    }
}

/// In the container's mount namespace, lazily unmounts every mount that is
/// neither the rootfs, below it, nor above it, so the old root left by the
/// chroot fallback holds only the initramfs files (no shares of other
/// containers). Returns the mounts above the rootfs (deepest first), which
/// can only go once the rootfs has moved away.
fn detach_other_mounts(rootfs: &Path) -> R<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p != Path::new("/") && !p.starts_with(rootfs))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    let (ancestors, others): (Vec<PathBuf>, Vec<PathBuf>) =
        points.into_iter().partition(|p| rootfs.starts_with(p));
    for p in others {
        detach(&p)?;
    }
    Ok(ancestors)
}

/// Lazily unmounts `p`; a path that is no (longer a) mount point, or gone
/// with a parent detached before it, is fine.
fn detach(p: &Path) -> R {
    match umount2(p, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(format!("detach {}: {}", p.display(), e.desc())),
    }
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// Masks a path after the switch: /dev/null over files, read-only tmpfs
/// over directories; missing paths are skipped.
fn mask(path: &Path) -> R {
    let Ok(meta) = fs::metadata(path) else {
        return Ok(());
    };
    let r = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    match r {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(format!("mask {}: {}", path.display(), e.desc())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape_mountinfo("/x\\"), PathBuf::from("/x\\"));
    }
}
