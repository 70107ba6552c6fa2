//! A CRI conformance-style suite's harness: containerd's CRI plugin driven
//! the way the kubelet drives it, with runc (the control) and capsule as
//! runtime handlers of one private containerd.
//!
//! - [`node`]: the private node (network namespace, containerd with CRI,
//!   CNI, images, capsule configuration) and its leak checks;
//! - [`containerd`]: which containerd (`CAPSULE_CONTAINERD`) and its
//!   configuration (1.x `version = 2`, 2.x `version = 3`; the capsule
//!   handler's `sandboxer`);
//! - [`client`]: a blocking CRI v1 client with deadlines, [`proto`] its
//!   generated messages;
//! - [`stream`]: websocket sessions with the streaming server (Exec,
//!   Attach, PortForward);
//! - [`spec`]: pod and container configurations as the kubelet sends them;
//! - [`suite`]: cases, their context and cleanup; [`report`]: tables and
//!   verdict.
pub mod client;
pub mod containerd;
pub mod image;
pub mod node;
pub mod proto;
pub mod report;
pub mod spec;
pub mod stream;
pub mod suite;
