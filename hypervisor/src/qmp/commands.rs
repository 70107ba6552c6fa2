//! Typed wrappers of the QMP commands capsule uses for queries.
use serde_json::json;

use super::{
    BlockNodeInfo, ChardevInfo, ObjectPropertyInfo, PciBusInfo, QmpClient, QmpError, StatusInfo,
};

impl QmpClient {
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.call("query-status", None).await
    }

    pub async fn query_pci(&self) -> Result<Vec<PciBusInfo>, QmpError> {
        self.call("query-pci", None).await
    }

    pub async fn qom_list(&self, path: &str) -> Result<Vec<ObjectPropertyInfo>, QmpError> {
        self.call("qom-list", Some(json!({ "path": path }))).await
    }

    pub async fn query_chardev(&self) -> Result<Vec<ChardevInfo>, QmpError> {
        self.call("query-chardev", None).await
    }

    /// Named block nodes only (`flat`: without their backing chains).
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockNodeInfo>, QmpError> {
        self.call("query-named-block-nodes", Some(json!({ "flat": true })))
            .await
    }

    /// Ids of the user-created devices (`/machine/peripheral`) with their
    /// QOM type.
    pub async fn peripheral_devices(&self) -> Result<Vec<(String, String)>, QmpError> {
        Ok(self
            .qom_list("/machine/peripheral")
            .await?
            .into_iter()
            .filter_map(|p| p.child_type().map(|t| (p.name.clone(), t.to_owned())))
            .collect())
    }

    /// Ids of the user-created objects (`/objects`).
    pub async fn user_objects(&self) -> Result<Vec<(String, String)>, QmpError> {
        Ok(self
            .qom_list("/objects")
            .await?
            .into_iter()
            .filter_map(|p| p.child_type().map(|t| (p.name.clone(), t.to_owned())))
            .collect())
    }
}
