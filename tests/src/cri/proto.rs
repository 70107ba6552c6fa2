//! CRI v1 (`runtime.v1`): messages and gRPC clients, generated from cri-api's
//! `pkg/apis/runtime/v1/api.proto` by the k8s-cri crate.
pub use k8s_cri::v1;
