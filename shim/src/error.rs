//! The shim's error type and its mapping to ttrpc status codes.
//!
//! An [`Error`] keeps the failure as a typed source (the device manager,
//! the resolver, the hypervisor, the guest agent, I/O, a state file) under
//! layers of context. Its `Display` is the whole chain, `what: why: cause`;
//! containerd shows it to the user (`ctr: …`) with one `capsule: ` prefix,
//! added only at the ttrpc boundary ([`Error::to_ttrpc`]).
use std::fmt;

use capsule_agent_protocol::client::ClientError;
use capsule_devmgr::{BackendErrorKind, ManagerError, ResolveError};
use capsule_hypervisor::HypervisorError;
use capsule_state_file::StateFileError;

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

/// A shim error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A failure the shim itself detected.
    #[error("{message}")]
    Shim { kind: Kind, message: String },
    /// A system call failed while doing `what`.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Devices(#[from] ManagerError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("{}", agent_message(.0))]
    Agent(#[from] ClientError),
    #[error(transparent)]
    State(#[from] StateFileError),
    /// What the shim was doing when `source` happened.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
    /// `source`, and more trouble while undoing what led to it.
    #[error("{source}; {note}")]
    Noted {
        #[source]
        source: Box<Error>,
        note: String,
    },
}

/// The agent's own message already names the container and the cause.
fn agent_message(e: &ClientError) -> String {
    match e {
        ClientError::Status {
            method, message, ..
        } => format!("guest agent ({method}): {message}"),
        other => format!("guest agent: {other}"),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error::Shim {
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

    /// Wraps the error with what was being done (`what: error`), keeping
    /// its kind and source.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error::Context {
            context: what.to_string(),
            source: Box::new(self),
        }
    }

    /// Appends `; note` (e.g. trouble while rolling back).
    pub fn note(self, note: impl fmt::Display) -> Self {
        Error::Noted {
            source: Box::new(self),
            note: note.to_string(),
        }
    }

    /// The status class.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Shim { kind, .. } => *kind,
            Error::Io { source, .. } => io_kind(source),
            Error::Devices(e) => manager_kind(e),
            Error::Resolve(e) => resolve_kind(e),
            Error::Hypervisor(HypervisorError::Config(_)) => Kind::InvalidArgument,
            Error::Hypervisor(_) | Error::State(_) => Kind::Internal,
            Error::Agent(e) => agent_kind(e),
            Error::Context { source, .. } | Error::Noted { source, .. } => source.kind(),
        }
    }

    /// The status containerd gets: the message with one `capsule: ` prefix.
    pub fn to_ttrpc(&self) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(
            self.kind().code(),
            format!("capsule: {self}"),
        ))
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        e.to_ttrpc()
    }
}

/// Wraps an I/O error with what was being done.
pub fn io(what: impl fmt::Display, source: std::io::Error) -> Error {
    Error::Io {
        what: what.to_string(),
        source,
    }
}

fn io_kind(e: &std::io::Error) -> Kind {
    match e.kind() {
        std::io::ErrorKind::NotFound => Kind::NotFound,
        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => Kind::InvalidArgument,
        std::io::ErrorKind::TimedOut => Kind::DeadlineExceeded,
        _ => Kind::Internal,
    }
}

fn resolve_kind(e: &ResolveError) -> Kind {
    use ResolveError as R;
    match e {
        R::Config(_) => Kind::Internal,
        R::InvalidDevice { .. } | R::DuplicatePath { .. } => Kind::InvalidArgument,
        R::NotFound { .. } | R::Vfio { .. } | R::VhostStore { .. } => Kind::NotFound,
        R::InUse { .. } | R::Io { .. } | R::Uevent { .. } => Kind::FailedPrecondition,
    }
}

fn manager_kind(e: &ManagerError) -> Kind {
    use ManagerError as M;
    match e {
        M::UnknownDevice { .. } => Kind::NotFound,
        M::InvalidDevice { .. } | M::Conflict { .. } => Kind::InvalidArgument,
        M::Refused { .. } | M::Exhausted { .. } => Kind::FailedPrecondition,
        M::Backend { source, .. } if source.kind == BackendErrorKind::Timeout => {
            Kind::DeadlineExceeded
        }
        M::Rollback { source, .. } => manager_kind(source),
        _ => Kind::Internal,
    }
}

fn agent_kind(e: &ClientError) -> Kind {
    match e {
        ClientError::Timeout { .. } | ClientError::NotReady { .. } => Kind::DeadlineExceeded,
        ClientError::Status { code, .. } => match *code {
            ttrpc::Code::NOT_FOUND => Kind::NotFound,
            ttrpc::Code::INVALID_ARGUMENT => Kind::InvalidArgument,
            ttrpc::Code::FAILED_PRECONDITION => Kind::FailedPrecondition,
            ttrpc::Code::ALREADY_EXISTS => Kind::AlreadyExists,
            ttrpc::Code::UNIMPLEMENTED => Kind::Unimplemented,
            ttrpc::Code::DEADLINE_EXCEEDED => Kind::DeadlineExceeded,
            _ => Kind::Internal,
        },
        _ => Kind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn codes_map_to_ttrpc_with_one_prefix() {
        let e = Error::unimplemented("checkpoint is not supported").to_ttrpc();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED);
                assert_eq!(s.message(), "capsule: checkpoint is not supported");
            }
            other => panic!("{other:?}"),
        }
        let e = Error::not_found("x").context("container c1");
        assert_eq!(e.to_string(), "container c1: x");
        assert_eq!(e.kind(), Kind::NotFound);
        let e = e.context("starting").note("rolling back failed too");
        assert_eq!(
            e.to_string(),
            "starting: container c1: x; rolling back failed too"
        );
        assert_eq!(e.kind(), Kind::NotFound);
    }

    #[test]
    fn sources_stay_typed() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = io_err_chain(io);
        assert_eq!(e.kind(), Kind::NotFound);
        // Context -> Io -> std::io::Error, walkable.
        let io_src = e.source().and_then(|s| s.source());
        assert!(io_src.is_some_and(|s| s.is::<std::io::Error>()));
        let m = Error::from(ManagerError::UnknownDevice {
            id: capsule_devmgr::DeviceId(3),
        })
        .context("detaching");
        assert_eq!(m.kind(), Kind::NotFound);
        assert!(matches!(
            &m,
            Error::Context { source, .. } if matches!(**source, Error::Devices(ManagerError::UnknownDevice { .. }))
        ));
    }

    fn io_err_chain(e: std::io::Error) -> Error {
        io("reading config.json", e).context("container c1")
    }
}
