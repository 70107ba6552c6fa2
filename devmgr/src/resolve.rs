//! Host resolution: from a validated [`DeviceInfo`] to the [`HostDevice`]
//! backing it on this host.
//!
//! Order of the checks in [`Resolver::resolve`]:
//! 1. the vhost-user store (when enabled) for `b 241:*` / `b 242:*`;
//! 2. fifos: the container path must be a fifo on the host;
//! 3. device nodes: `<sysfs_root>/dev/{char,block}/MAJ:MIN/uevent` gives
//!    `DEVNAME`, the node is `<dev_root>/<DEVNAME>`; without a sysfs entry the
//!    container path (`/dev/X` -> `<dev_root>/X`) is accepted if it is a node
//!    of the same type and number on the host;
//! 4. a node under `<dev_root>/vfio/` is a VFIO group or cdev (see [`vfio`]),
//!    other block nodes are [`DeviceKind::Block`], the rest
//!    [`DeviceKind::Generic`].
//!
//! Every node found is checked with `lstat`: it must not be a symlink and
//! must have the requested type and `major:minor`.
//!
//! [`vfio`]: crate::vfio
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::device::{DevType, DeviceInfo, DeviceKind, HostDevice, MAX_MAJOR, MAX_MINOR};
use crate::uevent::{Uevent, UeventError};
use crate::{in_use, oci, vfio, vhost_store};

/// Largest `uevent` file read; real ones are a few hundred bytes.
const UEVENT_MAX_BYTES: u64 = 64 * 1024;

/// Why a device could not be translated or resolved. Every message names the
/// device (container path and/or `b 8:0`) and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The resolver was configured wrongly (relative root, ...).
    #[error("device resolver configuration: {0}")]
    Config(String),
    /// The request itself is invalid (bad path, type, number, mode, rule).
    #[error("device {device}: {reason}")]
    InvalidDevice { device: String, reason: String },
    /// Two `linux.devices` entries share a container path.
    #[error("devices {first} and {second}: duplicate container path {path}")]
    DuplicatePath {
        path: String,
        first: String,
        second: String,
    },
    /// Nothing suitable on the host.
    #[error("device {device}: {reason}")]
    NotFound { device: String, reason: String },
    /// A host file could not be read.
    #[error("device {device}: {}: {source}", .path.display())]
    Io {
        device: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A host block device the host itself uses (mounted, holding a mounted
    /// filesystem, swap): never given to a VM.
    #[error("device {device}: refused: {reason}; a disk the host uses is never given to a VM")]
    InUse { device: String, reason: String },
    /// A sysfs `uevent` file is malformed or disagrees with the request.
    #[error("device {device}: {}: {source}", .path.display())]
    Uevent {
        device: String,
        path: PathBuf,
        #[source]
        source: UeventError,
    },
    /// A VFIO group or cdev could not be resolved.
    #[error("device {device}: VFIO {group}: {reason}")]
    Vfio {
        device: String,
        group: String,
        reason: String,
    },
    /// A vhost-user device could not be resolved in the store.
    #[error("device {device}: vhost-user store {}: {reason}", .store.display())]
    VhostStore {
        device: String,
        store: PathBuf,
        reason: String,
    },
}

impl ResolveError {
    pub(crate) fn invalid(device: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidDevice {
            device: device.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn not_found(device: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::NotFound {
            device: device.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn io(device: impl Into<String>, path: &Path, source: io::Error) -> Self {
        Self::Io {
            device: device.into(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// `"/dev/xvdb (b 8:0)"`: how errors and logs name a device.
pub fn describe(info: &DeviceInfo) -> String {
    format!(
        "{} ({} {}:{})",
        info.container_path.display(),
        info.dev_type,
        info.major,
        info.minor
    )
}

/// Where the resolver looks. Roots are parameters so tests can use fixture
/// trees; all of them must be absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Normally `/sys`.
    pub sysfs_root: PathBuf,
    /// Normally `/dev`.
    pub dev_root: PathBuf,
    /// vhost-user store directory; `None` disables vhost-user resolution.
    pub vhost_user_store: Option<PathBuf>,
    /// Normally `/proc` (mounts and swaps: a disk the host uses is refused).
    pub proc_root: PathBuf,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            vhost_user_store: None,
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// A container's devices, translated from its OCI spec and resolved on the
/// host exactly once (at Create): what
/// [`DeviceManager::attach_container`](crate::DeviceManager::attach_container)
/// attaches. Only [`Resolver::resolve_spec`] makes one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedDevices {
    devices: Vec<HostDevice>,
    /// `linux.devices` entries of a privileged spec that were not passed
    /// through (containerd's list of every host device).
    skipped_host_devices: usize,
}

impl ResolvedDevices {
    pub fn len(&self) -> usize {
        self.devices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &HostDevice> {
        self.devices.iter()
    }
    /// How many host devices of a privileged spec were left out.
    pub fn skipped_host_devices(&self) -> usize {
        self.skipped_host_devices
    }
    pub(crate) fn into_vec(self) -> Vec<HostDevice> {
        self.devices
    }
}

/// Resolves container device requests to host devices.
#[derive(Debug, Clone)]
pub struct Resolver {
    config: ResolverConfig,
}

impl Resolver {
    /// Checks the configuration: every root must be absolute.
    pub fn new(config: ResolverConfig) -> Result<Self, ResolveError> {
        check_root("sysfs_root", &config.sysfs_root)?;
        check_root("dev_root", &config.dev_root)?;
        check_root("proc_root", &config.proc_root)?;
        if let Some(store) = &config.vhost_user_store {
            check_root("vhost_user_store", store)?;
        }
        Ok(Self { config })
    }

    /// The configuration this resolver was built with.
    pub fn config(&self) -> &ResolverConfig {
        &self.config
    }

    /// Resolves one device. The request is re-validated first, so a
    /// hand-built [`DeviceInfo`] with a relative path is rejected, never
    /// looked up.
    pub fn resolve(&self, info: &DeviceInfo) -> Result<HostDevice, ResolveError> {
        oci::validate_info(info)?;
        if let Some(store) = &self.config.vhost_user_store {
            if vhost_store::vhost_kind(info).is_some() {
                return vhost_store::lookup(store, info);
            }
        }
        if info.dev_type == DevType::Fifo {
            return self.resolve_fifo(info);
        }
        let host_path = self.host_node(info)?;
        let kind = self.classify(info, &host_path)?;
        tracing::debug!(device = %describe(info), host = %host_path.display(), kind = kind.name(), "resolved device");
        Ok(HostDevice {
            info: Some(info.clone()),
            host_path,
            kind,
        })
    }

    /// Resolves every device, stopping at the first error.
    pub fn resolve_all(&self, infos: &[DeviceInfo]) -> Result<Vec<HostDevice>, ResolveError> {
        infos.iter().map(|info| self.resolve(info)).collect()
    }

    /// Translates the `linux.devices` of `spec` and resolves each entry once.
    ///
    /// A privileged spec (see [`oci::is_privileged_with_host_devices`]:
    /// what containerd writes for a privileged container together with its
    /// list of *every* host device, unless `privileged_without_host_devices`
    /// is set) gets none of those host devices: inside its VM it gets the
    /// guest's devices instead. Nothing of the host reaches a VM unless a
    /// container asked for it by name.
    pub fn resolve_spec(
        &self,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<ResolvedDevices, ResolveError> {
        let infos = oci::spec_devices(spec)?;
        if oci::is_privileged_with_host_devices(spec) {
            if !infos.is_empty() {
                tracing::info!(
                    devices = infos.len(),
                    "privileged container: the host devices in its spec are not passed through; it gets the guest's devices"
                );
            }
            return Ok(ResolvedDevices {
                devices: Vec::new(),
                skipped_host_devices: infos.len(),
            });
        }
        Ok(ResolvedDevices {
            devices: self.resolve_all(&infos)?,
            skipped_host_devices: 0,
        })
    }

    /// The host path a container path stands for: `/dev/X` is
    /// `<dev_root>/X`; any other (absolute, validated) path is itself.
    pub fn host_path_for(&self, container_path: &Path) -> PathBuf {
        match container_path.strip_prefix("/dev") {
            Ok(rest) if !rest.as_os_str().is_empty() => self.config.dev_root.join(rest),
            _ => container_path.to_path_buf(),
        }
    }

    fn resolve_fifo(&self, info: &DeviceInfo) -> Result<HostDevice, ResolveError> {
        let host_path = self.host_path_for(&info.container_path);
        let dev = describe(info);
        match fs::symlink_metadata(&host_path) {
            Ok(m) if m.file_type().is_fifo() => Ok(HostDevice {
                info: Some(info.clone()),
                host_path,
                kind: DeviceKind::Generic,
            }),
            Ok(m) => Err(ResolveError::not_found(
                dev,
                format!("{} is a {}, not a fifo", host_path.display(), file_kind(&m)),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ResolveError::not_found(
                dev,
                format!(
                    "{} is not a fifo on the host: it does not exist",
                    host_path.display()
                ),
            )),
            Err(e) => Err(ResolveError::io(dev, &host_path, e)),
        }
    }

    /// Finds and checks the host node for a block or char device.
    fn host_node(&self, info: &DeviceInfo) -> Result<PathBuf, ResolveError> {
        let dev = describe(info);
        let uevent_path = self.uevent_path(info);
        let Some(uevent) = read_uevent(&uevent_path, &dev)? else {
            return self.node_without_sysfs(info);
        };
        check_uevent_numbers(&uevent, info, &uevent_path)?;
        let devname = uevent.devname().map_err(|source| ResolveError::Uevent {
            device: dev.clone(),
            path: uevent_path.clone(),
            source,
        })?;
        let Some(devname) = devname else {
            tracing::debug!(device = %dev, uevent = %uevent_path.display(), "no DEVNAME; using the container path");
            return self.node_without_sysfs(info);
        };
        let host_path = self.config.dev_root.join(devname);
        check_node(&host_path, info).map_err(|why| {
            ResolveError::not_found(
                dev,
                format!(
                    "sysfs names it {}, but {} is not {} on the host ({why})",
                    devname.display(),
                    host_path.display(),
                    node_words(info)
                ),
            )
        })?;
        Ok(host_path)
    }

    fn node_without_sysfs(&self, info: &DeviceInfo) -> Result<PathBuf, ResolveError> {
        let host_path = self.host_path_for(&info.container_path);
        check_node(&host_path, info).map_err(|why| {
            ResolveError::not_found(
                describe(info),
                format!(
                    "no sysfs entry and {} is not {} on the host ({why})",
                    host_path.display(),
                    node_words(info)
                ),
            )
        })?;
        Ok(host_path)
    }

    fn uevent_path(&self, info: &DeviceInfo) -> PathBuf {
        let dir = info.dev_type.sysfs_dir().unwrap_or("char");
        self.config
            .sysfs_root
            .join("dev")
            .join(dir)
            .join(format!("{}:{}", info.major, info.minor))
            .join("uevent")
    }

    fn classify(&self, info: &DeviceInfo, host_path: &Path) -> Result<DeviceKind, ResolveError> {
        if let Ok(rel) = host_path.strip_prefix(self.config.dev_root.join("vfio")) {
            return vfio::resolve_node(&self.config.sysfs_root, info, rel);
        }
        Ok(match info.dev_type {
            DevType::Block => {
                self.refuse_in_use(info)?;
                DeviceKind::Block
            }
            _ => DeviceKind::Generic,
        })
    }

    /// Refuses a block device the host uses (see [`crate::in_use`]).
    fn refuse_in_use(&self, info: &DeviceInfo) -> Result<(), ResolveError> {
        let c = &self.config;
        let found =
            in_use::block_device_in_use(&c.sysfs_root, &c.proc_root, info.major, info.minor)
                .map_err(|e| {
                    ResolveError::io(describe(info), &c.proc_root.join("self/mountinfo"), e)
                })?;
        match found {
            Some(reason) => Err(ResolveError::InUse {
                device: describe(info),
                reason,
            }),
            None => Ok(()),
        }
    }
}

fn check_root(name: &str, path: &Path) -> Result<(), ResolveError> {
    if !path.is_absolute() {
        return Err(ResolveError::Config(format!(
            "{name} {:?} must be an absolute path",
            path.display().to_string()
        )));
    }
    Ok(())
}

/// Reads and parses a `uevent` file; `Ok(None)` when there is no such entry.
fn read_uevent(path: &Path, dev: &str) -> Result<Option<Uevent>, ResolveError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(ResolveError::io(dev, path, e)),
    };
    let mut buf = Vec::new();
    file.take(UEVENT_MAX_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ResolveError::io(dev, path, e))?;
    if buf.len() as u64 > UEVENT_MAX_BYTES {
        return Err(ResolveError::io(
            dev,
            path,
            io::Error::new(io::ErrorKind::InvalidData, "uevent file larger than 64 KiB"),
        ));
    }
    Uevent::parse(&buf)
        .map(Some)
        .map_err(|source| ResolveError::Uevent {
            device: dev.to_owned(),
            path: path.to_path_buf(),
            source,
        })
}

/// A missing path (or a missing directory on the way to it).
pub(crate) fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

fn check_uevent_numbers(
    uevent: &Uevent,
    info: &DeviceInfo,
    path: &Path,
) -> Result<(), ResolveError> {
    let wrap = |source: UeventError| ResolveError::Uevent {
        device: describe(info),
        path: path.to_path_buf(),
        source,
    };
    let major = uevent.major().map_err(wrap)?;
    let minor = uevent.minor().map_err(wrap)?;
    if major.is_some_and(|m| m != info.major) || minor.is_some_and(|m| m != info.minor) {
        let show = |v: Option<u32>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
        return Err(ResolveError::not_found(
            describe(info),
            format!(
                "{} says {}:{}, not the requested {}:{}",
                path.display(),
                show(major),
                show(minor),
                info.major,
                info.minor
            ),
        ));
    }
    Ok(())
}

/// `"a block device 8:0"`.
fn node_words(info: &DeviceInfo) -> String {
    let what = match info.dev_type {
        DevType::Block => "a block device",
        DevType::Fifo => "a fifo",
        DevType::Char | DevType::CharUnbuffered => "a char device",
    };
    format!("{what} {}:{}", info.major, info.minor)
}

/// Checks with `lstat` that `path` is a device node of `info`'s type and
/// number. Returns the reason it is not.
pub(crate) fn check_node(path: &Path, info: &DeviceInfo) -> Result<(), String> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if is_missing(&e) => return Err("it does not exist".to_owned()),
        Err(e) => return Err(format!("cannot stat it: {e}")),
    };
    let ft = meta.file_type();
    let type_ok = match info.dev_type {
        DevType::Block => ft.is_block_device(),
        DevType::Char | DevType::CharUnbuffered => ft.is_char_device(),
        DevType::Fifo => ft.is_fifo(),
    };
    if !type_ok {
        return Err(format!("it is a {}", file_kind(&meta)));
    }
    let (major, minor) = rdev_numbers(meta.rdev());
    if (major, minor) != (u64::from(info.major), u64::from(info.minor)) {
        return Err(format!("it is {} {major}:{minor}", file_kind(&meta)));
    }
    Ok(())
}

/// `(major, minor)` of a `st_rdev`.
pub(crate) fn rdev_numbers(rdev: u64) -> (u64, u64) {
    (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
}

/// The `st_rdev` of `major:minor`, or `None` if out of the Linux range.
pub(crate) fn rdev_of(major: u32, minor: u32) -> Option<u64> {
    (major <= MAX_MAJOR && minor <= MAX_MINOR)
        .then(|| nix::sys::stat::makedev(u64::from(major), u64::from(minor)))
}

/// Human name of a file's type, for errors.
pub(crate) fn file_kind(meta: &fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_file() {
        "regular file"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "char device"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str, dev_type: DevType, major: u32, minor: u32) -> DeviceInfo {
        DeviceInfo::new(path, dev_type, major, minor)
    }

    #[test]
    fn describe_names_path_type_and_numbers() {
        assert_eq!(
            describe(&info("/dev/xvdb", DevType::Block, 8, 0)),
            "/dev/xvdb (b 8:0)"
        );
    }

    #[test]
    fn relative_roots_are_rejected() {
        let bad = ResolverConfig {
            sysfs_root: "sys".into(),
            ..Default::default()
        };
        let e = Resolver::new(bad).unwrap_err();
        assert!(e.to_string().contains("sysfs_root"), "{e}");
        let bad = ResolverConfig {
            vhost_user_store: Some("store".into()),
            ..Default::default()
        };
        assert!(Resolver::new(bad)
            .unwrap_err()
            .to_string()
            .contains("vhost_user_store"));
        let bad = ResolverConfig {
            dev_root: "".into(),
            ..Default::default()
        };
        assert!(Resolver::new(bad).is_err());
        assert!(Resolver::new(ResolverConfig::default()).is_ok());
    }

    #[test]
    fn container_paths_map_into_dev_root() {
        let r = Resolver::new(ResolverConfig {
            dev_root: "/fx/dev".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            r.host_path_for(Path::new("/dev/fuse")),
            Path::new("/fx/dev/fuse")
        );
        assert_eq!(
            r.host_path_for(Path::new("/dev/vfio/12")),
            Path::new("/fx/dev/vfio/12")
        );
        assert_eq!(
            r.host_path_for(Path::new("/devices/x")),
            Path::new("/devices/x")
        );
        assert_eq!(r.host_path_for(Path::new("/run/f")), Path::new("/run/f"));
    }

    #[test]
    fn uevent_paths_by_type() {
        let r = Resolver::new(ResolverConfig {
            sysfs_root: "/fx/sys".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            r.uevent_path(&info("/dev/sda", DevType::Block, 8, 0)),
            Path::new("/fx/sys/dev/block/8:0/uevent")
        );
        assert_eq!(
            r.uevent_path(&info("/dev/x", DevType::CharUnbuffered, 1, 3)),
            Path::new("/fx/sys/dev/char/1:3/uevent")
        );
    }

    #[test]
    fn relative_container_paths_are_never_looked_up() {
        let r = Resolver::new(ResolverConfig::default()).unwrap();
        let e = r.resolve(&info("uevent", DevType::Char, 1, 3)).unwrap_err();
        assert!(matches!(e, ResolveError::InvalidDevice { .. }), "{e}");
        let e = r
            .resolve(&info("/dev/null", DevType::Char, MAX_MAJOR + 1, 3))
            .unwrap_err();
        assert!(matches!(e, ResolveError::InvalidDevice { .. }), "{e}");
    }

    #[test]
    fn rdev_round_trip() {
        let rdev = rdev_of(MAX_MAJOR, MAX_MINOR).unwrap();
        assert_eq!(
            rdev_numbers(rdev),
            (u64::from(MAX_MAJOR), u64::from(MAX_MINOR))
        );
        assert_eq!(rdev_of(MAX_MAJOR + 1, 0), None);
        assert_eq!(rdev_of(0, MAX_MINOR + 1), None);
    }

    #[test]
    fn check_node_reports_why() {
        let i = info("/dev/null", DevType::Char, 1, 3);
        assert_eq!(
            check_node(Path::new("/nonexistent/capsule/x"), &i).unwrap_err(),
            "it does not exist"
        );
        assert_eq!(
            check_node(Path::new("/"), &i).unwrap_err(),
            "it is a directory"
        );
    }
}
