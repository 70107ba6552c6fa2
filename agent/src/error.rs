//! Agent errors and their ttrpc status codes.
//!
//! Every message names the object (container, exec, device, storage) and what
//! was wrong with it, because it ends up in the shim's log and in the user's
//! `ctr`/`crictl` output.
use ttrpc::Code;

use crate::device::DeviceError;

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Unknown container, exec or device.
    #[error("{0}")]
    NotFound(String),
    /// Malformed request or OCI spec.
    #[error("{0}")]
    InvalidArgument(String),
    /// An id that is already in use.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object exists but is in the wrong state (e.g. start twice).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A wait gave up (device did not appear, process did not stop).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Anything the caller could not have avoided.
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) => Code::NOT_FOUND,
            Self::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Self::Internal(_) => Code::INTERNAL,
        }
    }

    /// Prefixes the message with context, keeping the code.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        let wrap = |m: String| format!("{what}: {m}");
        match self {
            Self::NotFound(m) => Self::NotFound(wrap(m)),
            Self::InvalidArgument(m) => Self::InvalidArgument(wrap(m)),
            Self::AlreadyExists(m) => Self::AlreadyExists(wrap(m)),
            Self::FailedPrecondition(m) => Self::FailedPrecondition(wrap(m)),
            Self::DeadlineExceeded(m) => Self::DeadlineExceeded(wrap(m)),
            Self::Internal(m) => Self::Internal(wrap(m)),
        }
    }

    pub fn internal(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{what}: {e}"))
    }

    pub fn invalid(what: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(what.to_string())
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

impl From<DeviceError> for AgentError {
    fn from(e: DeviceError) -> Self {
        let msg = e.to_string();
        if e.is_timeout() {
            return Self::DeadlineExceeded(msg);
        }
        match e {
            DeviceError::Duplicate { .. }
            | DeviceError::SameNode { .. }
            | DeviceError::Invalid { .. } => Self::InvalidArgument(msg),
            _ => Self::Internal(msg),
        }
    }
}

/// `io::Error` with the action and path that failed.
pub fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> AgentError {
    if e.kind() == std::io::ErrorKind::NotFound {
        AgentError::NotFound(format!("{what}: {e}"))
    } else {
        AgentError::Internal(format!("{what}: {e}"))
    }
}

/// `nix` errno with the action that failed.
pub fn sys_err(what: impl std::fmt::Display, e: nix::errno::Errno) -> AgentError {
    AgentError::Internal(format!("{what}: {}", e.desc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_context() {
        let e = AgentError::NotFound("exec \"e1\" not found".into()).context("container \"c1\"");
        assert_eq!(e.code(), Code::NOT_FOUND);
        assert_eq!(e.to_string(), "container \"c1\": exec \"e1\" not found");
        let t: ttrpc::Error = AgentError::AlreadyExists("x".into()).into();
        match t {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::ALREADY_EXISTS);
                assert_eq!(s.message(), "x");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
