//! The ttrpc face of the Sandbox API: each RPC logged, run on the shared
//! state (see the parent module) and its error mapped to a status code.
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::sandbox_api as api;
use containerd_shim_protos::sandbox_async::Sandbox as SandboxRpc;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::types::platform::Platform;

use super::{create, go_arch, metrics, ping, pod_of, shutdown, start, status, stop, wait};
use crate::service::{reply, Inner};

/// The Sandbox API on the task service's state. Cheap to clone.
#[derive(Clone)]
pub struct SandboxService {
    pub(crate) inner: Arc<Inner>,
}

#[async_trait]
impl SandboxRpc for SandboxService {
    async fn create_sandbox(
        &self,
        _c: &TtrpcContext,
        req: api::CreateSandboxRequest,
    ) -> ::ttrpc::Result<api::CreateSandboxResponse> {
        let id = req.sandbox_id.clone();
        tracing::info!(sandbox = %id, bundle = %req.bundle_path, "CreateSandbox");
        reply("CreateSandbox", &id, create(&self.inner, req).await)
    }

    async fn start_sandbox(
        &self,
        _c: &TtrpcContext,
        req: api::StartSandboxRequest,
    ) -> ::ttrpc::Result<api::StartSandboxResponse> {
        let id = req.sandbox_id.clone();
        tracing::info!(sandbox = %id, "StartSandbox");
        reply("StartSandbox", &id, start(&self.inner, req).await)
    }

    async fn platform(
        &self,
        _c: &TtrpcContext,
        req: api::PlatformRequest,
    ) -> ::ttrpc::Result<api::PlatformResponse> {
        let id = req.sandbox_id.clone();
        let r = pod_of(&self.inner, &id).map(|_| api::PlatformResponse {
            platform: MessageField::some(Platform {
                os: "linux".into(),
                architecture: go_arch().into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        reply("Platform", &id, r)
    }

    async fn stop_sandbox(
        &self,
        _c: &TtrpcContext,
        req: api::StopSandboxRequest,
    ) -> ::ttrpc::Result<api::StopSandboxResponse> {
        let id = req.sandbox_id.clone();
        tracing::info!(sandbox = %id, "StopSandbox");
        reply("StopSandbox", &id, stop(&self.inner, req).await)
    }

    async fn wait_sandbox(
        &self,
        _c: &TtrpcContext,
        req: api::WaitSandboxRequest,
    ) -> ::ttrpc::Result<api::WaitSandboxResponse> {
        let id = req.sandbox_id.clone();
        reply("WaitSandbox", &id, wait(&self.inner, req).await)
    }

    async fn sandbox_status(
        &self,
        _c: &TtrpcContext,
        req: api::SandboxStatusRequest,
    ) -> ::ttrpc::Result<api::SandboxStatusResponse> {
        let id = req.sandbox_id.clone();
        reply("SandboxStatus", &id, status(&self.inner, req).await)
    }

    async fn ping_sandbox(
        &self,
        _c: &TtrpcContext,
        req: api::PingRequest,
    ) -> ::ttrpc::Result<api::PingResponse> {
        let id = req.sandbox_id.clone();
        reply("PingSandbox", &id, ping(&self.inner, req).await)
    }

    async fn shutdown_sandbox(
        &self,
        _c: &TtrpcContext,
        req: api::ShutdownSandboxRequest,
    ) -> ::ttrpc::Result<api::ShutdownSandboxResponse> {
        let id = req.sandbox_id.clone();
        tracing::info!(sandbox = %id, "ShutdownSandbox");
        reply("ShutdownSandbox", &id, shutdown(&self.inner, req).await)
    }

    async fn sandbox_metrics(
        &self,
        _c: &TtrpcContext,
        req: api::SandboxMetricsRequest,
    ) -> ::ttrpc::Result<api::SandboxMetricsResponse> {
        let id = req.sandbox_id.clone();
        reply("SandboxMetrics", &id, metrics(&self.inner, req).await)
    }
}
