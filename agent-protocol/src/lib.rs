//! Protocol between the capsule shim and the guest agent.
//!
//! - [`wire`]: the value types both sides agree on (PCI paths, SCSI
//!   addresses). No heavy dependencies, so host-side crates such as
//!   `capsule-devmgr` use it without ttrpc (default features off).
//! - [`agent`] and [`agent_ttrpc`] (feature `rpc`): the messages and the
//!   `capsule.agent.v1.Agent` service generated from `protos/agent.proto`.
//! - [`client`] (feature `rpc`): `AgentConn`, the host side of the
//!   connection over QEMU's virtio-serial socket.
#![forbid(unsafe_code)]

pub mod wire;

#[cfg(feature = "rpc")]
#[allow(
    clippy::all,
    non_camel_case_types,
    non_upper_case_globals,
    unused_mut,
    unused_imports
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[cfg(feature = "rpc")]
#[allow(
    clippy::all,
    non_camel_case_types,
    non_upper_case_globals,
    unused_mut,
    unused_imports
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// Host side of the agent connection (serial handshake + ttrpc client).
#[cfg(feature = "rpc")]
pub mod client;

/// The protocol package the agent serves, reported in `GuestDetails`.
pub const PROTOCOL: &str = "capsule.agent.v1";

#[cfg(feature = "rpc")]
pub use {protobuf, ttrpc};
