//! QMP client errors.
use std::time::Duration;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// QEMU answered the command with an error object.
    #[error("QMP {command}: QEMU error {class}: {desc}")]
    Command {
        command: String,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        desc: String,
    },
    /// No answer within the deadline. The command may still run in QEMU.
    #[error("QMP {command}: no reply within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    /// The connection to QEMU is gone (QEMU exited or closed the monitor);
    /// every pending and future command on this client fails with it.
    #[error("QMP connection lost{}: {reason}", .command.as_deref().map(|c| format!(" during {c}")).unwrap_or_default())]
    Disconnected {
        command: Option<String>,
        reason: String,
    },
    #[error("QMP {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// QEMU sent something that is not QMP (bad JSON, missing greeting,
    /// a reply of the wrong shape).
    #[error("QMP protocol error: {0}")]
    Protocol(String),
}

impl QmpError {
    /// QEMU's error class, when QEMU answered with an error.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// QEMU's error description, when QEMU answered with an error.
    pub fn desc(&self) -> Option<&str> {
        match self {
            QmpError::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }

    pub fn is_disconnected(&self) -> bool {
        matches!(self, QmpError::Disconnected { .. })
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, QmpError::Timeout { .. })
    }

    /// Replaces the command name of a `Disconnected` error.
    pub(crate) fn during(self, command: &str) -> Self {
        match self {
            QmpError::Disconnected { reason, .. } => QmpError::Disconnected {
                command: Some(command.to_owned()),
                reason,
            },
            other => other,
        }
    }
}
