//! Agent errors and their ttrpc status codes.
//!
//! Every message names the object (container, exec, device, storage) and what
//! was wrong with it, because it ends up in the shim's log and in the user's
//! `ctr`/`crictl` output.
use ttrpc::Code;

use crate::container::seccomp::SeccompError;
use crate::device::DeviceError;

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// An agent error: what failed, the ttrpc code it maps to ([`Self::code`]),
/// and, where a lower layer failed, that error as the typed `source`.
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
    /// A system call failed (INTERNAL).
    #[error("{what}: {}", .source.desc())]
    Sys {
        what: String,
        #[source]
        source: nix::errno::Errno,
    },
    /// A file operation failed (NOT_FOUND for a missing file, else INTERNAL).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The device module refused a device or gave up waiting for it.
    #[error("{what}: {source}")]
    Device {
        what: String,
        #[source]
        source: DeviceError,
    },
    /// JSON from the host that does not parse (INVALID_ARGUMENT).
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// A seccomp profile libseccomp cannot compile (INVALID_ARGUMENT).
    #[error("{what}: {source}")]
    Seccomp {
        what: String,
        #[source]
        source: SeccompError,
    },
    /// Any other lower-layer failure (INTERNAL).
    #[error("{what}: {source}")]
    Other {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Context around another agent error; keeps its code.
    #[error("{what}: {source}")]
    Context {
        what: String,
        #[source]
        source: Box<AgentError>,
    },
}

impl AgentError {
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) => Code::NOT_FOUND,
            Self::InvalidArgument(_) | Self::Json { .. } | Self::Seccomp { .. } => {
                Code::INVALID_ARGUMENT
            }
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Self::Internal(_) | Self::Sys { .. } | Self::Other { .. } => Code::INTERNAL,
            Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Code::NOT_FOUND
            }
            Self::Io { .. } => Code::INTERNAL,
            Self::Device { source, .. } => device_code(source),
            Self::Context { source, .. } => source.code(),
        }
    }

    /// Prefixes the message with context, keeping the code and the source.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        Self::Context {
            what: what.to_string(),
            source: Box::new(self),
        }
    }

    /// A lower-layer failure the caller could not have avoided.
    pub fn internal(
        what: impl std::fmt::Display,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Other {
            what: what.to_string(),
            source: Box::new(e),
        }
    }

    pub fn invalid(what: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(what.to_string())
    }

    /// A device module error about `what` (usually the container).
    pub fn device(what: impl std::fmt::Display, e: DeviceError) -> Self {
        Self::Device {
            what: what.to_string(),
            source: e,
        }
    }
}

fn device_code(e: &DeviceError) -> Code {
    if e.is_timeout() {
        return Code::DEADLINE_EXCEEDED;
    }
    match e {
        DeviceError::Duplicate { .. }
        | DeviceError::SameNode { .. }
        | DeviceError::Invalid { .. } => Code::INVALID_ARGUMENT,
        _ => Code::INTERNAL,
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// `io::Error` with the action and path that failed.
pub fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> AgentError {
    AgentError::Io {
        what: what.to_string(),
        source: e,
    }
}

/// `nix` errno with the action that failed.
pub fn sys_err(what: impl std::fmt::Display, e: nix::errno::Errno) -> AgentError {
    AgentError::Sys {
        what: what.to_string(),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_kept_with_their_codes() {
        use std::error::Error as _;
        let e = io_err(
            "open /x",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
        .context("container \"c\"");
        assert_eq!(e.code(), Code::NOT_FOUND);
        let io = e
            .source()
            .and_then(|s| s.source())
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("the io::Error is the source's source");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        let e = sys_err("setns", nix::errno::Errno::EPERM);
        assert_eq!(e.code(), Code::INTERNAL);
        assert_eq!(
            e.source()
                .and_then(|s| s.downcast_ref::<nix::errno::Errno>()),
            Some(&nix::errno::Errno::EPERM)
        );
        assert!(e.to_string().starts_with("setns: "), "{e}");
        let d = AgentError::device(
            "container \"c\"",
            DeviceError::Timeout {
                device: crate::device::DeviceRef::new("dev1", "blk-pci", "02/00"),
                waited: std::time::Duration::from_secs(2),
                last: "nothing".into(),
            },
        );
        assert_eq!(d.code(), Code::DEADLINE_EXCEEDED);
        assert!(d.source().is_some_and(|s| s.is::<DeviceError>()));
        let j = serde_json::from_str::<u8>("x").unwrap_err();
        let o = AgentError::internal("config", j);
        assert_eq!(o.code(), Code::INTERNAL);
        assert!(o.source().is_some_and(|s| s.is::<serde_json::Error>()));
    }

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
