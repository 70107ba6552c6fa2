//! Host side of capsule's pod networking.
//!
//! - [`discover`]: what a pod's network namespace holds (links, addresses,
//!   routes, neighbours) — what the guest must be told.
//! - [`plumb`] / [`unplumb`]: Kata's tcfilter model. A tap beside the pod's
//!   link (veth, macvlan, ipvlan, vlan...) in the same namespace, an
//!   ingress qdisc on both and a u32 match-all `mirred egress redirect`
//!   filter on each towards the other; the tap's queue descriptors go to
//!   QEMU. [`EndpointRecord`] is what the caller persists to undo it after
//!   a crash.
//! - [`Netns`]: a checked namespace path and a way to run code in it on a
//!   dedicated thread (never on a tokio worker).
//!
//! Everything goes through route netlink (rtnetlink), with a deadline on
//! every request; errors name the namespace and the object.
mod discover;
pub mod error;
pub mod netns;
mod nl;
mod plumb;
mod tap;
mod tc;
#[cfg(feature = "test-utils")]
pub mod testutil;
pub mod types;

pub use discover::discover;
pub use error::{NetworkError, Result};
pub use netns::{Netns, NetnsId};
pub use plumb::{
    check_link, endpoints, plan, plumb, unplumb, EndpointRecord, PlumbOptions, Plumbed,
    UnplumbReport, DEFAULT_TIMEOUT, MAX_MTU, MIN_MTU, TAP_ALIAS_PREFIX,
};
pub use tap::{tap_name, IFNAME_MAX, MAX_QUEUES};
pub use tc::{COOKIE as FILTER_COOKIE, FILTER_PRIORITY};
pub use types::*;
