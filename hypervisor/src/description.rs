//! What a new runtime process needs to re-attach to a running VM, persisted
//! atomically next to its sockets.
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use capsule_devmgr::backend::AttachRequest;

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

    /// Writes the description atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let data = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(path, &data)
    }

    pub fn load(path: &Path) -> std::io::Result<Self> {
        let data = std::fs::read(path)?;
        let desc: Self = serde_json::from_slice(&data).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        if desc.version != DESCRIPTION_VERSION {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: description version {} (expected {DESCRIPTION_VERSION})",
                    path.display(),
                    desc.version
                ),
            ));
        }
        Ok(desc)
    }
}

/// Replaces `path` with `data` atomically: a reader sees the old or the new
/// content, never a truncated file.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
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
            .contains("version 99"));
    }
}
