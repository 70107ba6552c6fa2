//! Persistence of a sandbox's devices.
//!
//! One versioned JSON file per sandbox, `devices.json`:
//!
//! ```json
//! {
//!   "version": 2,
//!   "next_id": 3,
//!   "devices": [ { "id": "dev0", "host_path": "/dev/sda", "kind": {"kind": "block"},
//!                  "driver": "virtio-scsi", "uses": [ { "owner": {"owner": "container", "name": "c1"},
//!                               "request": { "container_path": "/dev/xvda", ... } } ],
//!                  "attach_count": 1, "status": "attached",
//!                  "resources": { "block_index": 0 },
//!                  "guest_address": { "type": "scsi", "address": "0:0" } } ],
//!   "allocators": {
//!     "block": { "space": "block", "start": 0, "end": 65536, "held": [0] },
//!     "pmem":  { "space": "pmem", "start": 0, "end": 4, "held": [] },
//!     "pci":   { "space": "pci-slot", "start": 1, "end": 32, "held": [] }
//!   }
//! }
//! ```
//!
//! [`FileStore`] replaces it atomically (temp file in the same directory,
//! fsync, rename, fsync of the directory) and holds an exclusive `flock` on
//! `devices.lock` for its lifetime, so two processes never write one sandbox.
//! [`decode`] refuses anything it cannot prove consistent; nothing is ever
//! written while loading.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub use capsule_state_file::{RealIo, StateIo};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};

use crate::alloc::{Allocators, IndexAllocator, Space, BLOCK_INDEXES};
use crate::manager::{DedupeKey, DeviceId, DeviceRecord, ManagerConfig};

/// The state-file version this build writes and reads.
pub const STATE_VERSION: u32 = 2;
/// Name of the state file inside the sandbox's state directory.
pub const STATE_FILE: &str = "devices.json";
/// Name of the lock file held by the [`FileStore`] owning the directory.
pub const LOCK_FILE: &str = "devices.lock";
/// Temporary file a write goes through; a leftover one is from a crash.
pub const TEMP_FILE: &str = "devices.json.tmp";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("device state in {} is locked by another process (another shim owns this sandbox)", dir.display())]
    Locked { dir: PathBuf },
    #[error("not valid device state: {0}")]
    Syntax(String),
    #[error("unsupported device state version {found} (this build reads version {supported})")]
    Version { found: u64, supported: u32 },
    #[error("inconsistent device state: {0}")]
    Inconsistent(String),
    #[error("cannot encode device state: {0}")]
    Encode(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Everything the manager persists. Equal states mean equal managers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxState {
    /// Id of the next device; ids are never reused.
    pub next_id: u64,
    pub devices: BTreeMap<DeviceId, DeviceRecord>,
    pub allocators: Allocators,
}

impl SandboxState {
    pub fn new(config: &ManagerConfig) -> Self {
        Self {
            next_id: 0,
            devices: BTreeMap::new(),
            allocators: Allocators::new(config.pmem_slots.clone(), config.pci_slots.clone()),
        }
    }
}

impl Serialize for SandboxState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Devices<'a>(&'a BTreeMap<DeviceId, DeviceRecord>);
        impl Serialize for Devices<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.values())
            }
        }
        let mut st = s.serialize_struct("SandboxState", 4)?;
        st.serialize_field("version", &STATE_VERSION)?;
        st.serialize_field("next_id", &self.next_id)?;
        st.serialize_field("devices", &Devices(&self.devices))?;
        st.serialize_field("allocators", &self.allocators)?;
        st.end()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    #[allow(dead_code)] // checked by the probe
    version: u64,
    next_id: u64,
    devices: Vec<DeviceRecord>,
    allocators: Allocators,
}

/// The bytes of `state` as written to the state file.
pub fn encode(state: &SandboxState) -> Result<Vec<u8>, StateError> {
    let mut bytes =
        serde_json::to_vec_pretty(state).map_err(|e| StateError::Encode(e.to_string()))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Parses and validates state bytes. Never panics; refuses (rather than
/// repairs) anything malformed, from a future version, or inconsistent.
pub fn decode(bytes: &[u8], config: &ManagerConfig) -> Result<SandboxState, StateError> {
    let found = capsule_state_file::check_version(bytes).map_err(StateError::Syntax)?;
    if found != u64::from(STATE_VERSION) {
        return Err(StateError::Version {
            found,
            supported: STATE_VERSION,
        });
    }
    let raw: RawState =
        serde_json::from_slice(bytes).map_err(|e| StateError::Syntax(e.to_string()))?;
    let mut devices = BTreeMap::new();
    for rec in raw.devices {
        let id = rec.id;
        if devices.insert(id, rec).is_some() {
            return Err(StateError::Inconsistent(format!(
                "device {id} appears twice"
            )));
        }
    }
    let state = SandboxState {
        next_id: raw.next_id,
        devices,
        allocators: raw.allocators,
    };
    validate(&state, config).map_err(StateError::Inconsistent)?;
    Ok(state)
}

/// Checks every invariant the manager keeps: per-record invariants, ids below
/// `next_id`, no two records for one device, allocator ranges matching the
/// configuration, and every held index owned by exactly one device.
pub fn validate(state: &SandboxState, config: &ManagerConfig) -> Result<(), String> {
    let a = &state.allocators;
    for (alloc, space, range) in [
        (&a.block, Space::Block, BLOCK_INDEXES),
        (&a.pmem, Space::Pmem, config.pmem_slots.clone()),
        (&a.pci, Space::PciSlot, config.pci_slots.clone()),
    ] {
        if alloc.space() != space {
            return Err(format!(
                "allocator for {space} is labelled {}",
                alloc.space()
            ));
        }
        if alloc.range() != range {
            return Err(format!(
                "{space} range {:?} differs from the configured {range:?}",
                alloc.range()
            ));
        }
    }
    let mut keys = HashSet::new();
    let mut owned: [BTreeMap<u32, DeviceId>; 3] = Default::default();
    for (id, rec) in &state.devices {
        if rec.id != *id {
            return Err(format!("device {} filed under {id}", rec.id));
        }
        if id.0 >= state.next_id {
            return Err(format!(
                "device {id} is not below next_id {}",
                state.next_id
            ));
        }
        rec.check()
            .map_err(|e| format!("device {}: {e}", rec.describe()))?;
        if !keys.insert(DedupeKey::of_record(rec)) {
            return Err(format!(
                "device {} duplicates another device",
                rec.describe()
            ));
        }
        for (space, index) in rec.resources.iter() {
            if let Some(other) = owned[space_slot(space)].insert(index, *id) {
                return Err(format!("{space} {index} is held by both {other} and {id}"));
            }
        }
    }
    for space in [Space::Block, Space::Pmem, Space::PciSlot] {
        let alloc: &IndexAllocator = a.get(space);
        let held: BTreeSet<u32> = alloc.held().collect();
        let owners = &owned[space_slot(space)];
        if let Some(i) = held.iter().find(|i| !owners.contains_key(i)) {
            return Err(format!("{space} {i} is allocated but no device holds it"));
        }
        if let Some((i, id)) = owners.iter().find(|(i, _)| !held.contains(i)) {
            return Err(format!("{space} {i} held by {id} is not allocated"));
        }
    }
    Ok(())
}

fn space_slot(space: Space) -> usize {
    match space {
        Space::Block => 0,
        Space::Pmem => 1,
        Space::PciSlot => 2,
    }
}

/// Where a manager keeps its state. `save` is called after every mutation,
/// with the manager's state lock held, so it must be quick; it receives the
/// state by reference and may ignore it (see [`NullStore`]).
pub trait StateStore: Send {
    /// Where the state lives, for messages (a path).
    fn location(&self) -> String;
    /// The last saved bytes; `None` when nothing was ever saved.
    fn load(&mut self) -> Result<Option<Vec<u8>>, StateError>;
    /// Replace the saved state atomically: after an error the previous state
    /// must still be what `load` returns.
    fn save(&mut self, state: &SandboxState) -> Result<(), StateError>;
}

/// A store that keeps nothing (benchmarks, tests of the manager alone).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullStore;

impl StateStore for NullStore {
    fn location(&self) -> String {
        "nowhere (state not persisted)".into()
    }
    fn load(&mut self) -> Result<Option<Vec<u8>>, StateError> {
        Ok(None)
    }
    fn save(&mut self, _state: &SandboxState) -> Result<(), StateError> {
        Ok(())
    }
}

/// The state of one sandbox in `<dir>/devices.json`, owned exclusively.
pub struct FileStore {
    dir: PathBuf,
    file: PathBuf,
    temp: PathBuf,
    io: Box<dyn StateIo>,
    _lock: Flock<File>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl FileStore {
    /// Opens (creating if needed) the state directory `dir` and locks it.
    /// Fails at once with [`StateError::Locked`] when another `FileStore`
    /// (in this or another process) holds it. Removes a temp file left by a
    /// crashed write; the last complete `devices.json` stays as it is.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StateError> {
        Self::open_with_io(dir, Box::new(RealIo))
    }

    /// [`FileStore::open`] writing through `io`.
    pub fn open_with_io(dir: impl AsRef<Path>, io: Box<dyn StateIo>) -> Result<Self, StateError> {
        let dir = dir.as_ref().to_path_buf();
        capsule_state_file::create_private_dir(&dir).map_err(io_err("create directory", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(io_err("open lock file", &lock_path))?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => return Err(StateError::Locked { dir }),
            Err((_, errno)) => {
                return Err(StateError::Io {
                    op: "lock",
                    path: lock_path,
                    source: errno.into(),
                })
            }
        };
        let temp = dir.join(TEMP_FILE);
        match std::fs::remove_file(&temp) {
            Ok(()) => {
                tracing::warn!(path = %temp.display(), "removed a state temp file left by an interrupted write")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StateError::Io {
                    op: "remove stale",
                    path: temp,
                    source: e,
                })
            }
        }
        Ok(Self {
            file: dir.join(STATE_FILE),
            temp,
            dir,
            io,
            _lock: lock,
        })
    }

    /// Path of `devices.json`.
    pub fn path(&self) -> &Path {
        &self.file
    }
}

impl StateStore for FileStore {
    fn location(&self) -> String {
        self.file.display().to_string()
    }

    fn load(&mut self) -> Result<Option<Vec<u8>>, StateError> {
        match std::fs::read(&self.file) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateError::Io {
                op: "read",
                path: self.file.clone(),
                source: e,
            }),
        }
    }

    fn save(&mut self, state: &SandboxState) -> Result<(), StateError> {
        let bytes = encode(state)?;
        // A failed directory fsync is still reported (naming the file): the
        // new file is in place but might not survive a power loss.
        capsule_state_file::replace(&mut *self.io, &self.dir, &self.temp, &self.file, &bytes)
            .map_err(|e| StateError::Io {
                op: e.op,
                path: e.path,
                source: e.source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::BlockDriver;

    fn config() -> ManagerConfig {
        ManagerConfig::new(BlockDriver::VirtioScsi, 1..32)
    }

    #[test]
    fn empty_state_round_trips() {
        let s = SandboxState::new(&config());
        let bytes = encode(&s).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"version\": 2"), "{text}");
        assert_eq!(decode(&bytes, &config()).unwrap(), s);
    }

    #[test]
    fn refuses_config_mismatch_and_bad_versions() {
        let bytes = encode(&SandboxState::new(&config())).unwrap();
        let other = ManagerConfig::new(BlockDriver::VirtioScsi, 1..8);
        let e = decode(&bytes, &other).unwrap_err();
        assert!(e.to_string().contains("PCI slot range"), "{e}");
        let future = String::from_utf8(bytes)
            .unwrap()
            .replace("\"version\": 2", "\"version\": 3");
        let e = decode(future.as_bytes(), &config()).unwrap_err();
        assert!(
            matches!(
                e,
                StateError::Version {
                    found: 3,
                    supported: 2
                }
            ),
            "{e}"
        );
    }
}
