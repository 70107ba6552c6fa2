//! Errors of discovery, plumbing and teardown. Each names the network
//! namespace and the object (link, tap, qdisc, filter) it is about.
use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub type Result<T, E = NetworkError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {path}: does not exist")]
    NetnsMissing { path: PathBuf },

    #[error("{path} is not a network namespace: {why}")]
    NotNetns { path: PathBuf, why: String },

    #[error("network namespace {netns}: {op}: {source}")]
    Io {
        netns: String,
        op: String,
        #[source]
        source: io::Error,
    },

    #[error("network namespace {netns}: {op}: {source}")]
    Netlink {
        netns: String,
        op: String,
        #[source]
        source: rtnetlink::Error,
    },

    #[error("network namespace {netns}: {op}: no answer within {timeout:?}")]
    Timeout {
        netns: String,
        op: String,
        timeout: Duration,
    },

    #[error("network namespace {netns}: link {link:?} not found")]
    LinkNotFound { netns: String, link: String },

    #[error("network namespace {netns}: no L2 link besides lo (links: {links})")]
    NoEndpoint { netns: String, links: String },

    #[error("network namespace {netns}: link {link:?} is a {kind} link, not an L2 link capsule can plumb: {why}")]
    NotL2 {
        netns: String,
        link: String,
        kind: String,
        why: String,
    },

    #[error("network namespace {netns}: link {link:?}: MTU {mtu} is outside what virtio-net takes ({min}..={max})")]
    MtuOutOfRange {
        netns: String,
        link: String,
        mtu: u32,
        min: u32,
        max: u32,
    },

    #[error("network namespace {netns}: {what}")]
    Conflict { netns: String, what: String },

    #[error("invalid request: {0}")]
    Invalid(String),

    #[error("network namespace {netns}: the namespace changed under us: {what}")]
    Changed { netns: String, what: String },
}

impl NetworkError {
    /// The link or namespace is gone: for teardown, "already gone".
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::NetnsMissing { .. } | Self::LinkNotFound { .. })
    }
}
