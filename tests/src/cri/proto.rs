//! CRI v1 (`runtime.v1`): messages and gRPC clients.
//!
//! `runtime.v1.rs` is generated from `api.proto` (cri-api's
//! `pkg/apis/runtime/v1/api.proto`, as shipped in the k8s-cri 0.11 crate) by
//! tonic-prost-build 0.14 with `build_server(false)`, and committed so the
//! build needs no `protoc` (Debian's is not installed by
//! scripts/install-deps.sh). `regen.sh` regenerates it.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    rustdoc::all,
    unused_qualifications
)]
pub mod v1 {
    include!("runtime.v1.rs");
}
