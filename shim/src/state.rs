//! Persisted state.
//!
//! Per sandbox, `<state_dir>/sandboxes/<id>/`:
//! - `devices.json` (+ `devices.lock`): the device manager's [`FileStore`],
//!   locked by the shim for its whole life;
//! - `vm.json` ([`VmRecord`]): the shim, QEMU and virtiofsd processes (pid
//!   **and** start time), sockets and paths;
//! - `containers.json` ([`ContainersFile`]): the containers, their bundles,
//!   what of them is mounted and which devices they use.
//!
//! Per container, in its bundle: `capsule.json` ([`BundleRecord`]): which
//! sandbox and state directory it belongs to, so `delete` finds them.
//!
//! Every file is versioned and written atomically (temp file, fsync,
//! rename, fsync of the directory); a file that does not parse, or has
//! another version, is refused with a message naming it, never repaired.
//!
//! [`FileStore`]: capsule_devmgr::FileStore
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use capsule_devmgr::BlockDriver;
use capsule_hypervisor::VmDescription;

use crate::error::{Error, Result};

pub const VM_FILE: &str = "vm.json";
pub const CONTAINERS_FILE: &str = "containers.json";
pub const BUNDLE_FILE: &str = "capsule.json";
pub const SHARED_DIR: &str = "shared";
pub const RUN_DIR: &str = "vm";
pub const VIRTIOFSD_SOCKET: &str = "virtiofsd.sock";
pub const VIRTIOFSD_LOG: &str = "virtiofsd.log";
pub const STATE_VERSION: u32 = 1;

/// A file with a `version` field, written atomically.
pub trait Versioned: Serialize + DeserializeOwned {
    const WHAT: &'static str;
    fn version(&self) -> u32;
}

/// Loads `path`: `Ok(None)` when it does not exist; an error naming the file
/// when it is unreadable, corrupt or of another version.
pub fn load<T: Versioned>(path: &Path) -> Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(crate::error::io(format!("reading {}", path.display()), e)),
    };
    #[derive(Deserialize)]
    struct Probe {
        version: u32,
    }
    let corrupt = |e: serde_json::Error| {
        Error::internal(format!(
            "{} {} is corrupt ({e}); refusing to use it (inspect it, or remove the sandbox with `capsule cleanup`)",
            T::WHAT,
            path.display()
        ))
    };
    let probe: Probe = serde_json::from_slice(&bytes).map_err(corrupt)?;
    if probe.version != STATE_VERSION {
        return Err(Error::internal(format!(
            "{} {} has version {}, this build reads version {STATE_VERSION}",
            T::WHAT,
            path.display(),
            probe.version
        )));
    }
    serde_json::from_slice(&bytes).map(Some).map_err(corrupt)
}

/// Writes `value` to `path` atomically.
pub fn save<T: Versioned>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::internal(format!("encoding {}: {e}", T::WHAT)))?;
    bytes.push(b'\n');
    capsule_devmgr::state::write_file_atomic(path, &bytes)
        .map_err(|e| Error::internal(format!("saving {} {}: {e}", T::WHAT, path.display())))
}

/// A process identified by pid **and** start time (field 22 of
/// `/proc/<pid>/stat`): a reused pid has another start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcRef {
    /// This process.
    pub fn current() -> Option<Self> {
        let pid = std::process::id();
        capsule_hypervisor::process::proc_start_time(pid)
            .ok()
            .map(|start_time| Self { pid, start_time })
    }
}

/// How the device manager was configured (its state only loads with the
/// same configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerRecord {
    pub block_driver: BlockDriver,
    pub pci_slots: (u32, u32),
    pub pmem_slots: (u32, u32),
}

impl ManagerRecord {
    pub fn config(&self) -> capsule_devmgr::ManagerConfig {
        capsule_devmgr::ManagerConfig {
            block_driver: self.block_driver,
            pci_slots: self.pci_slots.0..self.pci_slots.1,
            pmem_slots: self.pmem_slots.0..self.pmem_slots.1,
        }
    }
    pub fn of(c: &capsule_devmgr::ManagerConfig) -> Self {
        Self {
            block_driver: c.block_driver,
            pci_slots: (c.pci_slots.start, c.pci_slots.end),
            pmem_slots: (c.pmem_slots.start, c.pmem_slots.end),
        }
    }
}

/// `vm.json`: the sandbox's processes and paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    pub version: u32,
    pub sandbox_id: String,
    /// The shim serving the sandbox.
    pub shim: Option<ProcRef>,
    /// Its ttrpc address (for `capsule inspect` while it runs).
    pub shim_address: Option<String>,
    pub shared_dir: PathBuf,
    /// The shared dir is bind-mounted onto itself with shared propagation.
    pub shared_mounted: bool,
    pub virtiofsd: Option<ProcRef>,
    pub virtiofsd_socket: PathBuf,
    /// QEMU's run directory (its sockets, pidfile, logs).
    pub run_dir: PathBuf,
    /// QEMU's pidfile: what cleanup uses when the shim died before QEMU's
    /// description was saved.
    pub qemu_pidfile: PathBuf,
    /// Set once QEMU runs.
    pub qemu: Option<VmDescription>,
    pub manager: ManagerRecord,
}

impl Versioned for VmRecord {
    const WHAT: &'static str = "sandbox VM record";
    fn version(&self) -> u32 {
        self.version
    }
}

/// What of a container exists on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerStatus {
    /// Create is in progress.
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerRecord {
    pub id: String,
    pub bundle: PathBuf,
    pub status: ContainerStatus,
    /// `bundle/rootfs` was mounted by the shim.
    pub rootfs_mounted: bool,
    /// Mount points in the shared directory (rootfs bind, bind mounts).
    pub share_mounts: Vec<PathBuf>,
    /// Device manager ids of the devices the container uses, with the
    /// container path of each use.
    pub devices: Vec<ContainerDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerDevice {
    pub id: String,
    pub container_path: PathBuf,
}

/// `containers.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainersFile {
    pub version: u32,
    pub containers: BTreeMap<String, ContainerRecord>,
}

impl Versioned for ContainersFile {
    const WHAT: &'static str = "sandbox container list";
    fn version(&self) -> u32 {
        self.version
    }
}

/// `capsule.json` in a container's bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRecord {
    pub version: u32,
    pub container_id: String,
    pub sandbox_id: String,
    pub state_dir: PathBuf,
    /// The configuration file used (none: built-in defaults).
    pub config_path: Option<PathBuf>,
}

impl Versioned for BundleRecord {
    const WHAT: &'static str = "bundle record";
    fn version(&self) -> u32 {
        self.version
    }
}

/// Paths of one sandbox's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    pub dir: PathBuf,
}

impl SandboxPaths {
    pub fn new(state_dir: &Path, id: &str) -> Self {
        Self {
            dir: state_dir.join("sandboxes").join(id),
        }
    }
    pub fn vm_file(&self) -> PathBuf {
        self.dir.join(VM_FILE)
    }
    pub fn containers_file(&self) -> PathBuf {
        self.dir.join(CONTAINERS_FILE)
    }
    pub fn devices_file(&self) -> PathBuf {
        self.dir.join(capsule_devmgr::state::STATE_FILE)
    }
    pub fn devices_lock(&self) -> PathBuf {
        self.dir.join(capsule_devmgr::state::LOCK_FILE)
    }
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join(SHARED_DIR)
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join(RUN_DIR)
    }
    pub fn virtiofsd_socket(&self) -> PathBuf {
        self.dir.join(VIRTIOFSD_SOCKET)
    }
    pub fn virtiofsd_log(&self) -> PathBuf {
        self.dir.join(VIRTIOFSD_LOG)
    }
}

/// The live shim's writer of `containers.json`: every change is saved
/// before it is reported; a failed save leaves memory as the file is.
#[derive(Debug)]
pub struct ContainerStore {
    path: PathBuf,
    file: std::sync::Mutex<ContainersFile>,
}

impl ContainerStore {
    /// Opens the list in `paths.dir` (creating the directory), loading what
    /// is there; a corrupt file is refused.
    pub fn open(paths: &SandboxPaths) -> Result<Self> {
        std::fs::create_dir_all(&paths.dir)
            .map_err(|e| crate::error::io(format!("creating {}", paths.dir.display()), e))?;
        let path = paths.containers_file();
        let file = load::<ContainersFile>(&path)?.unwrap_or(ContainersFile {
            version: STATE_VERSION,
            containers: BTreeMap::new(),
        });
        Ok(Self {
            path,
            file: std::sync::Mutex::new(file),
        })
    }

    fn update(&self, f: impl FnOnce(&mut ContainersFile)) -> Result<()> {
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = guard.clone();
        f(&mut next);
        save(&self.path, &next)?;
        *guard = next;
        Ok(())
    }

    pub fn put(&self, rec: &ContainerRecord) -> Result<()> {
        let rec = rec.clone();
        self.update(|f| {
            f.containers.insert(rec.id.clone(), rec);
        })
    }

    /// Changes the status of a listed container; a container no longer
    /// listed (deleted meanwhile) stays unlisted.
    pub fn set_status(&self, id: &str, status: ContainerStatus) -> Result<()> {
        if !self
            .file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .containers
            .contains_key(id)
        {
            return Ok(());
        }
        self.update(|f| {
            if let Some(c) = f.containers.get_mut(id) {
                c.status = status;
            }
        })
    }

    pub fn remove(&self, id: &str) -> Result<()> {
        self.update(|f| {
            f.containers.remove(id);
        })
    }

    pub fn snapshot(&self) -> ContainersFile {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Checks an id is usable as a directory name (what containerd accepts).
pub fn check_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 76
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'+'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} {id:?} is not valid (letters, digits, '_', '-', '.', '+'; at most 76 characters)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ContainersFile {
        let mut f = ContainersFile {
            version: STATE_VERSION,
            ..Default::default()
        };
        f.containers.insert(
            "c1".into(),
            ContainerRecord {
                id: "c1".into(),
                bundle: "/b/c1".into(),
                status: ContainerStatus::Creating,
                rootfs_mounted: true,
                share_mounts: vec!["/s/c1/rootfs".into()],
                devices: vec![ContainerDevice {
                    id: "dev0".into(),
                    container_path: "/dev/xvda".into(),
                }],
            },
        );
        f
    }

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(CONTAINERS_FILE);
        assert_eq!(load::<ContainersFile>(&p).unwrap(), None);
        save(&p, &record()).unwrap();
        assert_eq!(load::<ContainersFile>(&p).unwrap(), Some(record()));
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replace("\"version\": 1", "\"version\": 7")).unwrap();
        let e = load::<ContainersFile>(&p).unwrap_err();
        assert!(
            e.message.contains("version 7") && e.message.contains("containers.json"),
            "{e}"
        );
        std::fs::write(&p, &text[..text.len() / 2]).unwrap();
        let e = load::<ContainersFile>(&p).unwrap_err();
        assert!(e.message.contains("corrupt"), "{e}");
        std::fs::write(
            &p,
            text.replace("\"rootfs_mounted\"", "\"bogus\": 1, \"rootfs_mounted\""),
        )
        .unwrap();
        assert!(load::<ContainersFile>(&p).is_err());
    }

    #[test]
    fn ids() {
        check_id("container id", "abc-1_2.3").unwrap();
        for bad in ["", "../x", "a/b", ".x", &"x".repeat(77)] {
            assert!(check_id("container id", bad).is_err(), "{bad}");
        }
    }
}
