//! capsule's containerd shim (`containerd-shim-capsule-v2`) and admin CLI
//! (`capsule`).
//!
//! - [`bootstrap`]: the shim binary's `start` / serve / `delete` modes;
//! - [`service`]: the containerd Task service (all 17 RPCs) on top of a
//!   [`sandbox::Sandbox`], publishing through an [`events::EventSink`];
//! - [`sandbox`]: the VM sandbox seam: [`sandbox::qemu`] (QEMU + virtiofsd +
//!   device manager + guest agent) and [`sandbox::fake`] for tests;
//! - [`task`]: the process state machine; [`io`]: stdio; [`mount`]: host
//!   mounts; [`state`]: persisted state; [`cleanup`]: teardown from any
//!   state; [`config`]: the TOML configuration; [`logging`]: logrus-format
//!   log lines for containerd; [`admin`]: the admin query endpoint;
//!   [`cli`]: the `capsule` command; [`fault`]: fault points for the crash
//!   matrix (debug builds).
pub mod admin;
pub mod bootstrap;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod error;
pub mod events;
pub mod fault;
pub mod io;
pub mod logging;
pub mod mount;
pub mod sandbox;
pub mod service;
pub mod state;
pub mod task;

/// The containerd protocol types the shim speaks (for tests and tools).
pub use containerd_shim_protos as protos;
pub use error::{Error, Result};
