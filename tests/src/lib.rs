//! End-to-end harness: a private containerd (1.6, 1.7 or 2.1:
//! `CAPSULE_CONTAINERD`, see [`containerd`]; its own root, state, socket and
//! config; the capsule runtime resolved through a private PATH entry), a busybox OCI image built by hand from the host's busybox-static
//! and imported with `ctr`, `ctr` invocations with deadlines, loop devices,
//! and leak checks (QEMU/virtiofsd processes, mounts, state files).
//!
//! Nothing system-wide changes except what containerd itself does: shim
//! sockets land in `/run/containerd/s/<hash of our socket>`.
//!
//! Besides the public modules [`containerd`], [`cri`] and [`netfix`], every
//! item is used from the crate root (`capsule_tests::X`); the private
//! modules only group them: `ready` (the prerequisites, [`require_ready`]),
//! `image` (the busybox test image), `host` (commands with deadlines,
//! processes, mounts, device nodes, one ttrpc call to a shim) and `env`
//! (the private containerd [`Env`]).
pub mod containerd;
pub mod cri;
pub mod netfix;

mod env;
mod host;
mod image;
mod ready;

use std::path::{Path, PathBuf};

pub use containerd::{Containerd, Version as ContainerdVersion};
pub use env::{CapsuleOptions, Env, SERVICE_PATH};
pub use host::{
    dead_shim_sockets, mknod, mknod_block, mounts_under, processes, run_with_timeout, shim_call,
    sigkill, stop_child, text, wait_for,
};
pub(crate) use image::fresh_image_dir;
pub use ready::{require_ready, shim_binaries, Ready};

pub const RUNTIME: &str = "io.containerd.capsule.v2";
pub const IMAGE: &str = "docker.io/library/capsule-busybox:latest";
pub const NAMESPACE: &str = "capsule-e2e";

pub fn workspace_root() -> PathBuf {
    // tests/ is a member directly under the workspace root.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
