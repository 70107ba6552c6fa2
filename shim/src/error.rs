//! The shim's error type and its mapping to ttrpc status codes.
//!
//! containerd shows the message of a failed RPC to the user (`ctr: ...`), so
//! every message says what failed and why in words, starting with
//! `capsule:` where it reaches the user through containerd.
use std::fmt;

/// ttrpc status code classes the shim reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NotFound,
    InvalidArgument,
    FailedPrecondition,
    AlreadyExists,
    Unimplemented,
    DeadlineExceeded,
    Internal,
}

impl Kind {
    pub fn code(self) -> ttrpc::Code {
        match self {
            Kind::NotFound => ttrpc::Code::NOT_FOUND,
            Kind::InvalidArgument => ttrpc::Code::INVALID_ARGUMENT,
            Kind::FailedPrecondition => ttrpc::Code::FAILED_PRECONDITION,
            Kind::AlreadyExists => ttrpc::Code::ALREADY_EXISTS,
            Kind::Unimplemented => ttrpc::Code::UNIMPLEMENTED,
            Kind::DeadlineExceeded => ttrpc::Code::DEADLINE_EXCEEDED,
            Kind::Internal => ttrpc::Code::INTERNAL,
        }
    }
}

/// A shim error: a class (ttrpc code) and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, m)
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, m)
    }
    pub fn precondition(m: impl Into<String>) -> Self {
        Self::new(Kind::FailedPrecondition, m)
    }
    pub fn exists(m: impl Into<String>) -> Self {
        Self::new(Kind::AlreadyExists, m)
    }
    pub fn unimplemented(m: impl Into<String>) -> Self {
        Self::new(Kind::Unimplemented, m)
    }
    pub fn deadline(m: impl Into<String>) -> Self {
        Self::new(Kind::DeadlineExceeded, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(Kind::Internal, m)
    }

    /// Prefixes the message with `what: `, keeping the kind.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        let what = what.to_string();
        let inner = match what.starts_with("capsule: ") {
            // One "capsule:" at the front is enough.
            true => self
                .message
                .strip_prefix("capsule: ")
                .unwrap_or(&self.message),
            false => &self.message,
        };
        self.message = format!("{what}: {inner}");
        self
    }

    /// Appends `; note` (e.g. trouble while rolling back).
    pub fn note(mut self, note: impl fmt::Display) -> Self {
        self.message = format!("{}; {note}", self.message);
        self
    }

    pub fn to_ttrpc(&self) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(self.kind.code(), &self.message))
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        e.to_ttrpc()
    }
}

/// Wraps an I/O error with what was being done.
pub fn io(what: impl fmt::Display, e: std::io::Error) -> Error {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => Kind::NotFound,
        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => Kind::InvalidArgument,
        std::io::ErrorKind::TimedOut => Kind::DeadlineExceeded,
        _ => Kind::Internal,
    };
    Error::new(kind, format!("{what}: {e}"))
}

impl From<capsule_devmgr::ResolveError> for Error {
    fn from(e: capsule_devmgr::ResolveError) -> Self {
        use capsule_devmgr::ResolveError as R;
        let kind = match &e {
            R::Config(_) => Kind::Internal,
            R::InvalidDevice { .. } | R::DuplicatePath { .. } => Kind::InvalidArgument,
            R::NotFound { .. } | R::Vfio { .. } | R::VhostStore { .. } => Kind::NotFound,
            R::Io { .. } | R::Uevent { .. } => Kind::FailedPrecondition,
        };
        Error::new(kind, e.to_string())
    }
}

impl Error {
    /// The status class of a device manager error.
    pub fn from_manager_kind(e: &capsule_devmgr::ManagerError) -> Kind {
        use capsule_devmgr::ManagerError as M;
        match e {
            M::UnknownDevice { .. } => Kind::NotFound,
            M::InvalidDevice { .. } | M::Conflict { .. } => Kind::InvalidArgument,
            M::Refused { .. } | M::Exhausted { .. } => Kind::FailedPrecondition,
            M::Backend { source, .. }
                if source.kind == capsule_devmgr::BackendErrorKind::Timeout =>
            {
                Kind::DeadlineExceeded
            }
            _ => Kind::Internal,
        }
    }
}

impl From<capsule_devmgr::ManagerError> for Error {
    fn from(e: capsule_devmgr::ManagerError) -> Self {
        Error::new(Error::from_manager_kind(&e), e.to_string())
    }
}

impl From<capsule_agent_protocol::client::ClientError> for Error {
    fn from(e: capsule_agent_protocol::client::ClientError) -> Self {
        use capsule_agent_protocol::client::ClientError as C;
        let kind = match &e {
            C::Timeout { .. } | C::NotReady { .. } => Kind::DeadlineExceeded,
            C::Status { code, .. } => match *code {
                ttrpc::Code::NOT_FOUND => Kind::NotFound,
                ttrpc::Code::INVALID_ARGUMENT => Kind::InvalidArgument,
                ttrpc::Code::FAILED_PRECONDITION => Kind::FailedPrecondition,
                ttrpc::Code::ALREADY_EXISTS => Kind::AlreadyExists,
                ttrpc::Code::UNIMPLEMENTED => Kind::Unimplemented,
                ttrpc::Code::DEADLINE_EXCEEDED => Kind::DeadlineExceeded,
                _ => Kind::Internal,
            },
            _ => Kind::Internal,
        };
        // The agent's own message already names the container and the cause.
        let message = match e {
            C::Status {
                method, message, ..
            } => format!("capsule: guest agent ({method}): {message}"),
            other => format!("capsule: guest agent: {other}"),
        };
        Error::new(kind, message)
    }
}

impl From<capsule_hypervisor::HypervisorError> for Error {
    fn from(e: capsule_hypervisor::HypervisorError) -> Self {
        use capsule_hypervisor::HypervisorError as H;
        let kind = match &e {
            H::Config(_) => Kind::InvalidArgument,
            _ => Kind::Internal,
        };
        Error::new(kind, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_ttrpc() {
        let e = Error::unimplemented("checkpoint is not supported").to_ttrpc();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED);
                assert_eq!(s.message(), "checkpoint is not supported");
            }
            other => panic!("{other:?}"),
        }
        let e = Error::not_found("x").context("container c1");
        assert_eq!(e.to_string(), "container c1: x");
        assert_eq!(e.kind, Kind::NotFound);
        let e = Error::internal("capsule: guest agent: gone").context("capsule: starting");
        assert_eq!(e.to_string(), "capsule: starting: guest agent: gone");
    }
}
