//! Errors of the VM lifecycle.
use capsule_device_api::BackendError;

use crate::process::AdoptError;
use crate::qmp::QmpError;

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("invalid VM config: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not come up; it has been killed and reaped.
    #[error("QEMU failed to start: {reason}{}", if .stderr.is_empty() { String::new() } else { format!("; QEMU said: {}", .stderr) })]
    Start { reason: String, stderr: String },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("cannot attach to the VM: {0}")]
    Adopt(#[from] AdoptError),
    /// A persisted VM description could not be read.
    #[error(transparent)]
    Description(#[from] capsule_state_file::StateFileError),
    /// The run directory belongs to a VM that is still running.
    #[error("a VM is already running in this run directory (pid {pid} from {}); stop it or attach to it instead of starting another", .pidfile.display())]
    AlreadyRunning {
        pid: u32,
        pidfile: std::path::PathBuf,
    },
    #[error("QEMU (pid {pid}) has exited ({how})")]
    Exited { pid: u32, how: String },
    #[error("stopping QEMU (pid {pid}): {reason}")]
    Stop { pid: u32, reason: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl HypervisorError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
