//! The guest half of a sandbox: what the service asks the guest agent.
use async_trait::async_trait;
use capsule_agent_protocol::agent;

use crate::error::Result;

/// Exit of a guest process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub status: u32,
    pub exited_at_secs: i64,
    pub exited_at_nanos: u32,
}

impl ExitStatus {
    /// An exit observed now (VM gone, process lost).
    pub fn now(status: u32) -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            status,
            exited_at_secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            exited_at_nanos: d.subsec_nanos(),
        }
    }
}

/// Guest cgroup statistics of a container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestStats {
    pub cgroup: agent::CgroupStats,
    /// "v1" or "v2".
    pub version: String,
}

/// The guest agent, as the task service uses it. Every call has the
/// agent client's deadline except the waits (process exit, OOM events).
#[async_trait]
pub trait Guest: Send + Sync {
    async fn create_container(&self, req: agent::CreateContainerRequest) -> Result<()>;
    /// Starts the init process; returns its guest pid.
    async fn start_container(&self, cid: &str) -> Result<u32>;
    /// Starts an exec; returns its guest pid.
    async fn exec_process(
        &self,
        cid: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdin: bool,
    ) -> Result<u32>;
    async fn signal_process(&self, cid: &str, exec_id: &str, signal: u32, all: bool) -> Result<()>;
    /// Waits for the process to exit (no deadline).
    async fn wait_process(&self, cid: &str, exec_id: &str) -> Result<ExitStatus>;
    /// Output; empty at end of stream.
    async fn read_output(
        &self,
        cid: &str,
        exec_id: &str,
        stderr: bool,
        len: u32,
    ) -> Result<Vec<u8>>;
    async fn write_stdin(&self, cid: &str, exec_id: &str, data: &[u8]) -> Result<usize>;
    async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<()>;
    async fn resize_pty(&self, cid: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()>;
    async fn pause(&self, cid: &str) -> Result<()>;
    async fn resume(&self, cid: &str) -> Result<()>;
    /// `resources`: OCI LinuxResources JSON.
    async fn update(&self, cid: &str, resources: Vec<u8>) -> Result<()>;
    async fn stats(&self, cid: &str) -> Result<GuestStats>;
    /// (guest pid, exec id) of every process.
    async fn list_processes(&self, cid: &str) -> Result<Vec<(u32, String)>>;
    async fn remove_container(&self, cid: &str) -> Result<()>;
    /// The first OOM kill after event `after` (0 at first): the container
    /// and the event's sequence number. Waits (no deadline) until there is
    /// one; consumes nothing.
    async fn next_oom_event(&self, after: u64) -> Result<(String, u64)>;
}
