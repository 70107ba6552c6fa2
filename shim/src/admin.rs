//! A small admin endpoint on the shim's ttrpc socket for `capsule inspect`:
//! QEMU serves one QMP client at a time and the running shim is it, so the
//! VM's real device list is asked from the shim. Payloads are JSON.
use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use ttrpc::r#async::{MethodHandler, Service, TtrpcContext};

use crate::error::{Error, Result};
use crate::service::TaskService;

pub const SERVICE: &str = "capsule.admin.v1.Admin";
pub const VM_DEVICES: &str = "VmDevices";

struct VmDevices {
    svc: TaskService,
}

#[async_trait]
impl MethodHandler for VmDevices {
    async fn handler(
        &self,
        _ctx: TtrpcContext,
        _req: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        let mut res = ttrpc::Response::new();
        match self.svc.vm_devices().await {
            Ok(v) => {
                res.set_status(ttrpc::get_status(ttrpc::Code::OK, ""));
                res.payload = serde_json::to_vec(&v).unwrap_or_default();
            }
            Err(e) => res.set_status(ttrpc::get_status(e.kind().code(), e.to_string())),
        }
        Ok(res)
    }
}

/// The admin service for the shim's ttrpc server.
pub fn service(svc: TaskService) -> HashMap<String, Service> {
    let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
    methods.insert(VM_DEVICES.into(), Box::new(VmDevices { svc }));
    let mut m = HashMap::new();
    m.insert(
        SERVICE.to_string(),
        Service {
            methods,
            streams: HashMap::new(),
        },
    );
    m
}

/// Asks the shim at `address` for its VM's devices.
pub async fn query_vm_devices(address: &str, timeout: Duration) -> Result<serde_json::Value> {
    let fut = async {
        let client = ttrpc::r#async::Client::connect(address)
            .await
            .map_err(|e| Error::internal(format!("connecting to the shim at {address}: {e}")))?;
        let mut req = ttrpc::Request::new();
        req.service = SERVICE.into();
        req.method = VM_DEVICES.into();
        req.timeout_nano = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX);
        let res = client
            .request(req)
            .await
            .map_err(|e| Error::internal(format!("asking the shim at {address}: {e}")))?;
        serde_json::from_slice(&res.payload)
            .map_err(|e| Error::internal(format!("the shim's answer is not JSON: {e}")))
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| {
        Error::deadline(format!(
            "the shim at {address} did not answer within {timeout:?}"
        ))
    })?
}
