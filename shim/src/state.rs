//! Persisted state: one layout, one versioning scheme, one atomic writer
//! (`capsule-state-file`).
//!
//! ```text
//! <state_dir>/                      0700
//!   sandboxes/<id>/                 0700
//!     sandbox.json                  0600  SandboxRecord: the shim, virtiofsd and
//!                                         QEMU processes (pid + start time), the
//!                                         VM description, the containers
//!     devices.json, devices.lock    0600  the device manager: every device, its
//!                                         owners (containers, the runtime),
//!                                         counts and guest addresses
//!     shared/                       0700  the virtio-fs share (rootfs, mounts)
//!     vm/                           0700  QEMU: qmp.sock, agent.sock, console.log,
//!                                         qemu.stderr, qemu.pid (0600)
//!     virtiofsd.sock, virtiofsd.log 0600
//!     netns                               the sandbox's own network namespace
//!                                         (bind mount), when the spec named none
//! <bundle>/capsule.json             0600  BundleRecord: which sandbox and state
//!                                         directory a container belongs to
//! ```
//!
//! Every file is a versioned JSON object replaced atomically (temp file,
//! fsync, rename, fsync of the directory); a file that does not parse, or
//! has another version, is refused with a message naming it and is never
//! overwritten. Which container uses which device is recorded only in
//! `devices.json`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use capsule_devmgr::BlockDriver;
use capsule_hypervisor::VmDescription;
use capsule_state_file::Versioned;

use crate::error::{Error, Result};

pub const SANDBOX_FILE: &str = "sandbox.json";
pub const BUNDLE_FILE: &str = "capsule.json";
pub const SHARED_DIR: &str = "shared";
pub const RUN_DIR: &str = "vm";
pub const VIRTIOFSD_SOCKET: &str = "virtiofsd.sock";
pub const VIRTIOFSD_LOG: &str = "virtiofsd.log";
/// The version of every shim state file this build reads and writes.
pub const STATE_VERSION: u32 = 2;

/// Loads a state file: `Ok(None)` when it does not exist; an error naming
/// the file when it is unreadable, corrupt or of another version.
pub fn load<T: Versioned>(path: &Path) -> Result<Option<T>> {
    capsule_state_file::load(path).map_err(Error::from)
}

/// Writes a state file atomically (0600).
pub fn save<T: Versioned>(path: &Path, value: &T) -> Result<()> {
    capsule_state_file::save(path, value).map_err(Error::from)
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

/// A container of the sandbox: what of it is on the host. Its devices are
/// in `devices.json`, owned by it.
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
}

/// `sandbox.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    pub version: u32,
    pub sandbox_id: String,
    /// The shim serving the sandbox.
    pub shim: Option<ProcRef>,
    /// Its ttrpc address (for `capsule inspect` while it runs).
    pub shim_address: Option<String>,
    /// The shared dir is bind-mounted onto itself with shared propagation.
    pub shared_mounted: bool,
    pub virtiofsd: Option<ProcRef>,
    /// Set once QEMU runs: the one persisted copy of its description.
    pub qemu: Option<VmDescription>,
    /// How the device manager was configured (its state loads only with
    /// the same configuration); set before the first device.
    pub manager: Option<ManagerRecord>,
    pub containers: BTreeMap<String, ContainerRecord>,
}

impl SandboxRecord {
    pub fn new(sandbox_id: &str) -> Self {
        Self {
            version: STATE_VERSION,
            sandbox_id: sandbox_id.to_string(),
            shim: None,
            shim_address: None,
            shared_mounted: false,
            virtiofsd: None,
            qemu: None,
            manager: None,
            containers: BTreeMap::new(),
        }
    }
}

impl Versioned for SandboxRecord {
    const WHAT: &'static str = "sandbox state";
    const VERSION: u32 = STATE_VERSION;
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
    const VERSION: u32 = STATE_VERSION;
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
    pub fn sandbox_file(&self) -> PathBuf {
        self.dir.join(SANDBOX_FILE)
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
    /// The sandbox's own network namespace (a bind mount), when the spec
    /// asked for a new one without a path.
    pub fn netns_file(&self) -> PathBuf {
        self.dir.join("netns")
    }
    /// QEMU's pidfile (what cleanup uses when the shim died before QEMU's
    /// description was saved).
    pub fn qemu_pidfile(&self) -> PathBuf {
        self.run_dir().join("qemu.pid")
    }
}

/// The live shim's writer of `sandbox.json`: every change is saved before
/// it is reported; a failed save leaves memory as the file is.
#[derive(Debug)]
pub struct SandboxStore {
    path: PathBuf,
    record: std::sync::Mutex<SandboxRecord>,
}

impl SandboxStore {
    /// Opens the record in `paths.dir` (creating the private directory),
    /// loading what is there or starting `sandbox_id`'s; a corrupt file is
    /// refused, never overwritten.
    pub fn open(paths: &SandboxPaths, sandbox_id: &str) -> Result<Self> {
        capsule_state_file::create_private_dir(&paths.dir)
            .map_err(|e| crate::error::io(format!("creating {}", paths.dir.display()), e))?;
        let path = paths.sandbox_file();
        let record = match load::<SandboxRecord>(&path)? {
            Some(r) if r.sandbox_id != sandbox_id => {
                return Err(Error::internal(format!(
                    "{} belongs to sandbox {}, not {sandbox_id}",
                    path.display(),
                    r.sandbox_id
                )))
            }
            Some(r) => r,
            None => SandboxRecord::new(sandbox_id),
        };
        Ok(Self {
            path,
            record: std::sync::Mutex::new(record),
        })
    }

    /// Applies `f` and saves; on a failed save memory stays as before.
    pub fn update(&self, f: impl FnOnce(&mut SandboxRecord)) -> Result<()> {
        let mut guard = self.record.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = guard.clone();
        f(&mut next);
        save(&self.path, &next)?;
        *guard = next;
        Ok(())
    }

    pub fn put_container(&self, rec: &ContainerRecord) -> Result<()> {
        let rec = rec.clone();
        self.update(|f| {
            f.containers.insert(rec.id.clone(), rec);
        })
    }

    /// Changes the status of a listed container; a container no longer
    /// listed (deleted meanwhile) stays unlisted.
    pub fn set_status(&self, id: &str, status: ContainerStatus) -> Result<()> {
        if !self.snapshot().containers.contains_key(id) {
            return Ok(());
        }
        self.update(|f| {
            if let Some(c) = f.containers.get_mut(id) {
                c.status = status;
            }
        })
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        self.update(|f| {
            f.containers.remove(id);
        })
    }

    pub fn snapshot(&self) -> SandboxRecord {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The device manager's records of a sandbox (`devices.json`), read
/// without taking its lock, validated against the configuration recorded in
/// `record`. No file: no devices.
pub fn load_devices(
    paths: &SandboxPaths,
    record: Option<&SandboxRecord>,
) -> std::result::Result<Vec<capsule_devmgr::DeviceRecord>, String> {
    let file = paths.devices_file();
    let bytes = match capsule_state_file::open_nofollow(&file).and_then(|mut f| {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut b).map(|_| b)
    }) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", file.display())),
    };
    let config = record
        .and_then(|v| v.manager.as_ref())
        .map(|m| m.config())
        .ok_or_else(|| {
            format!(
                "{} has no device manager configuration: cannot validate {}",
                paths.sandbox_file().display(),
                file.display()
            )
        })?;
    capsule_devmgr::state::decode(&bytes, &config)
        .map(|s| s.devices.into_values().collect())
        .map_err(|e| format!("{}: {e}", file.display()))
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

    fn record() -> SandboxRecord {
        let mut r = SandboxRecord::new("sb1");
        r.containers.insert(
            "c1".into(),
            ContainerRecord {
                id: "c1".into(),
                bundle: "/b/c1".into(),
                status: ContainerStatus::Creating,
                rootfs_mounted: true,
                share_mounts: vec!["/s/c1/rootfs".into()],
            },
        );
        r
    }

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(SANDBOX_FILE);
        assert_eq!(load::<SandboxRecord>(&p).unwrap(), None);
        save(&p, &record()).unwrap();
        assert_eq!(load::<SandboxRecord>(&p).unwrap(), Some(record()));
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replace("\"version\": 2", "\"version\": 7")).unwrap();
        let e = load::<SandboxRecord>(&p).unwrap_err().to_string();
        assert!(e.contains("version 7") && e.contains("sandbox.json"), "{e}");
        std::fs::write(&p, &text[..text.len() / 2]).unwrap();
        let e = load::<SandboxRecord>(&p).unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
        std::fs::write(
            &p,
            text.replace("\"rootfs_mounted\"", "\"bogus\": 1, \"rootfs_mounted\""),
        )
        .unwrap();
        assert!(load::<SandboxRecord>(&p).is_err());
    }

    #[test]
    fn store_refuses_another_sandbox_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SandboxPaths::new(dir.path(), "sb1");
        let store = SandboxStore::open(&paths, "sb1").unwrap();
        store.put_container(&record().containers["c1"]).unwrap();
        store.set_status("c1", ContainerStatus::Running).unwrap();
        let again = SandboxStore::open(&paths, "sb1").unwrap().snapshot();
        assert_eq!(again.containers["c1"].status, ContainerStatus::Running);
        let e = SandboxStore::open(&paths, "sb2").unwrap_err().to_string();
        assert!(e.contains("belongs to sandbox sb1"), "{e}");
        std::fs::write(paths.sandbox_file(), "{").unwrap();
        assert!(SandboxStore::open(&paths, "sb1").is_err());
        assert_eq!(std::fs::read(paths.sandbox_file()).unwrap(), b"{");
    }

    #[test]
    fn ids() {
        check_id("container id", "abc-1_2.3").unwrap();
        for bad in ["", "../x", "a/b", ".x", &"x".repeat(77)] {
            assert!(check_id("container id", bad).is_err(), "{bad}");
        }
    }
}
