//! What a new runtime process needs to re-attach to a running VM, or to
//! stop it after a crash. The runtime persists it once (the launcher hands
//! it to a [`crate::launch::DescriptionRecorder`]); as a file of its own it
//! is a capsule state file ([`capsule_state_file::Versioned`]).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use capsule_device_api::AttachRequest;

use crate::config::{Accel, MachineType, Timeouts};
use crate::layout::VmLayout;

/// Current format version.
pub const DESCRIPTION_VERSION: u32 = 1;

/// A running VM, as persisted for reconnection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    pub version: u32,
    /// QEMU's pid and its start time (field 22 of `/proc/<pid>/stat`):
    /// together they identify the process; a pid alone may be reused.
    pub pid: u32,
    pub start_time: u64,
    pub qemu_binary: PathBuf,
    pub run_dir: PathBuf,
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub console_log: PathBuf,
    pub pidfile: PathBuf,
    pub accel: Accel,
    pub machine: MachineType,
    /// q35 root ports (`rp0..`); 0 on pc.
    pub root_ports: u32,
    pub shared_memory: bool,
    pub scsi_controller: bool,
    pub nvdimm: bool,
    pub memory_mb: u64,
    /// Guest CID of vhost-vsock-pci, when present.
    pub vsock_cid: Option<u32>,
    /// Devices on the command line, with the PCI slots they were given.
    pub coldplugged: Vec<AttachRequest>,
    pub timeouts: Timeouts,
}

impl VmDescription {
    pub fn layout(&self) -> VmLayout {
        VmLayout {
            machine: self.machine,
            root_ports: self.root_ports,
            shared_memory: self.shared_memory,
            scsi_controller: self.scsi_controller,
            nvdimm: self.nvdimm,
        }
    }

    /// Writes the description to `path` as a state file of its own.
    pub fn save(&self, path: &Path) -> Result<(), capsule_state_file::StateFileError> {
        capsule_state_file::save(path, self)
    }

    /// Loads a description saved with [`save`](Self::save); a missing
    /// file is an error.
    pub fn load(path: &Path) -> Result<Self, capsule_state_file::StateFileError> {
        capsule_state_file::load(path)?.ok_or_else(|| capsule_state_file::StateFileError::Read {
            what: <Self as capsule_state_file::Versioned>::WHAT,
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }
}

impl capsule_state_file::Versioned for VmDescription {
    const WHAT: &'static str = "VM description";
    const VERSION: u32 = DESCRIPTION_VERSION;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmDescription {
        VmDescription {
            version: DESCRIPTION_VERSION,
            pid: 42,
            start_time: 1234,
            qemu_binary: "qemu-system-x86_64".into(),
            run_dir: "/run/x".into(),
            qmp_socket: "/run/x/qmp.sock".into(),
            agent_socket: "/run/x/agent.sock".into(),
            console_log: "/run/x/console.log".into(),
            pidfile: "/run/x/qemu.pid".into(),
            accel: Accel::Tcg,
            machine: MachineType::Q35,
            root_ports: 4,
            shared_memory: true,
            scsi_controller: true,
            nvdimm: false,
            memory_mb: 256,
            vsock_cid: None,
            coldplugged: vec![],
            timeouts: Timeouts::default(),
        }
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.json");
        sample().save(&p).unwrap();
        assert_eq!(VmDescription::load(&p).unwrap(), sample());
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mut v = sample();
        v.version = 99;
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(VmDescription::load(&p)
            .unwrap_err()
            .to_string()
            .contains("has version 99"));
    }
}
