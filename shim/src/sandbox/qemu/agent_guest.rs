//! The guest half of a QEMU sandbox: every call goes to the guest agent
//! over its virtio-serial connection, with the agent client's deadlines.
use std::time::Duration;

use async_trait::async_trait;
use capsule_agent_protocol::agent;
use capsule_agent_protocol::client::AgentConn;

use crate::error::Result;
use crate::sandbox::{ExitStatus, Guest, GuestStats};

/// The guest agent of one sandbox.
pub struct AgentGuest {
    pub(super) agent: AgentConn,
    /// Deadline of CreateContainer (it waits for the container's devices).
    pub(super) create_timeout: Duration,
    /// `timeouts.device_wait`, sent to the agent with each CreateContainer.
    pub(super) device_wait: Duration,
}

fn process_req(cid: &str, exec_id: &str) -> agent::ProcessRequest {
    agent::ProcessRequest {
        container_id: cid.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    }
}

fn container_req(cid: &str) -> agent::ContainerRequest {
    agent::ContainerRequest {
        container_id: cid.into(),
        ..Default::default()
    }
}

#[async_trait]
impl Guest for AgentGuest {
    async fn create_container(&self, mut req: agent::CreateContainerRequest) -> Result<()> {
        req.device_timeout_ms = u32::try_from(self.device_wait.as_millis()).unwrap_or(u32::MAX);
        self.agent
            .call(
                "CreateContainer",
                Some(self.create_timeout),
                |c, ctx| async move { c.create_container(ctx, &req).await },
            )
            .await?;
        Ok(())
    }

    async fn start_container(&self, cid: &str) -> Result<u32> {
        Ok(self.agent.start_container(&container_req(cid)).await?.pid)
    }

    async fn exec_process(
        &self,
        cid: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdin: bool,
    ) -> Result<u32> {
        let req = agent::ExecProcessRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            process,
            stdin,
            ..Default::default()
        };
        Ok(self.agent.exec_process(&req).await?.pid)
    }

    async fn signal_process(&self, cid: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let req = agent::SignalProcessRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.agent.signal_process(&req).await?;
        Ok(())
    }

    async fn wait_process(&self, cid: &str, exec_id: &str) -> Result<ExitStatus> {
        let r = self.agent.wait_process(&process_req(cid, exec_id)).await?;
        // The exit is stamped with the host's clock when the wait returns
        // (as Kata's shim does): containerd stamps the start with its own
        // clock, and the guest's clock (TCG, no kvmclock) drifts from the
        // host's, so the guest's stamp can come before the start.
        Ok(ExitStatus::now(u32::try_from(r.status).unwrap_or(255)))
    }

    async fn read_output(
        &self,
        cid: &str,
        exec_id: &str,
        stderr: bool,
        len: u32,
    ) -> Result<Vec<u8>> {
        let req = agent::ReadStreamRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            len,
            ..Default::default()
        };
        let r = if stderr {
            self.agent.read_stderr(&req).await?
        } else {
            self.agent.read_stdout(&req).await?
        };
        Ok(r.data)
    }

    async fn write_stdin(&self, cid: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        let req = agent::WriteStreamRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            data: data.to_vec(),
            ..Default::default()
        };
        Ok(self.agent.write_stdin(&req).await?.len as usize)
    }

    async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<()> {
        self.agent.close_stdin(&process_req(cid, exec_id)).await?;
        Ok(())
    }

    async fn resize_pty(&self, cid: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let req = agent::TtyWinResizeRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            rows,
            cols,
            ..Default::default()
        };
        self.agent.tty_win_resize(&req).await?;
        Ok(())
    }

    async fn pause(&self, cid: &str) -> Result<()> {
        self.agent.pause_container(&container_req(cid)).await?;
        Ok(())
    }

    async fn resume(&self, cid: &str) -> Result<()> {
        self.agent.resume_container(&container_req(cid)).await?;
        Ok(())
    }

    async fn update(&self, cid: &str, resources: Vec<u8>) -> Result<()> {
        let req = agent::UpdateContainerRequest {
            container_id: cid.into(),
            resources,
            ..Default::default()
        };
        self.agent.update_container(&req).await?;
        Ok(())
    }

    async fn stats(&self, cid: &str) -> Result<GuestStats> {
        let r = self.agent.stats_container(&container_req(cid)).await?;
        Ok(GuestStats {
            cgroup: r.cgroup.into_option().unwrap_or_default(),
            version: r.cgroup_version,
        })
    }

    async fn list_processes(&self, cid: &str) -> Result<Vec<(u32, String)>> {
        let r = self.agent.list_processes(&container_req(cid)).await?;
        Ok(r.processes
            .into_iter()
            .map(|p| (p.pid, p.exec_id))
            .collect())
    }

    async fn remove_container(&self, cid: &str) -> Result<()> {
        let req = agent::RemoveContainerRequest {
            container_id: cid.into(),
            timeout: 10,
            ..Default::default()
        };
        self.agent
            .call(
                "RemoveContainer",
                Some(Duration::from_secs(30)),
                |c, ctx| async move { c.remove_container(ctx, &req).await },
            )
            .await?;
        Ok(())
    }

    async fn next_oom_event(&self, after: u64) -> Result<(String, u64)> {
        let req = agent::GetOOMEventRequest {
            after,
            ..Default::default()
        };
        let e = self.agent.get_oom_event(&req).await?;
        Ok((e.container_id, e.seq))
    }
}
