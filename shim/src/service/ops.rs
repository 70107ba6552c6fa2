//! Every RPC but Create.
use std::sync::Arc;

use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::oci::ProcessDetails;
use containerd_shim_protos::types::task::ProcessInfo;

use super::process::{AgentStreams, Container, Process, OUTPUT_DRAIN};
use super::Inner;
use crate::cleanup::{self, KillTiming, RealProcesses};
use crate::error::{Error, Kind, Result};
use crate::events::{EventSink, TaskEvent};
use crate::fault;
use crate::io::{HostIo, IoContext, StdioConfig};
use crate::sandbox::ExitStatus;
use crate::state::ContainerStatus;
use crate::task::{Op, Status};

fn timestamp(e: Option<ExitStatus>) -> MessageField<Timestamp> {
    match e {
        Some(e) => MessageField::some(Timestamp {
            seconds: e.exited_at_secs,
            nanos: i32::try_from(e.exited_at_nanos).unwrap_or(0),
            ..Default::default()
        }),
        None => MessageField::none(),
    }
}

pub fn state(inner: &Inner, req: api::StateRequest) -> Result<api::StateResponse> {
    let c = inner.container(&req.id)?;
    let p = c.process(&req.exec_id)?;
    let exit = p.exit_status();
    Ok(api::StateResponse {
        id: req.id,
        bundle: c.bundle.display().to_string(),
        pid: p.pid(),
        status: p.status().to_api().into(),
        stdin: p.stdio.stdin.clone(),
        stdout: p.stdio.stdout.clone(),
        stderr: p.stdio.stderr.clone(),
        terminal: p.stdio.terminal,
        exit_status: exit.map(|e| e.status).unwrap_or(0),
        exited_at: timestamp(exit),
        exec_id: req.exec_id,
        ..Default::default()
    })
}

/// Waits for the process's exit in the guest, then (output drained)
/// publishes TaskExit and marks it stopped, in that order.
fn spawn_waiter(c: Arc<Container>, p: Arc<Process>, events: Arc<dyn EventSink>) {
    if !p.claim_waiter() {
        return;
    }
    tokio::spawn(async move {
        let exit = match c.sandbox.guest().wait_process(&c.id, &p.exec_id).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(process = %p.what(), error = %e, "lost the process (VM or agent gone); reporting exit 255");
                ExitStatus::now(255)
            }
        };
        if exit.status == 128 + 9 {
            // Killed: maybe by the guest's OOM killer, which CRI must hear
            // of before the exit.
            c.oom.flush_before_exit().await;
        }
        if let Some(io) = p.io() {
            if !io.wait_output(OUTPUT_DRAIN).await {
                tracing::warn!(process = %p.what(), "output still open after the exit; publishing the exit anyway");
            }
        }
        tracing::info!(process = %p.what(), status = exit.status, "exited");
        events
            .publish(TaskEvent::Exit(TaskExit {
                container_id: c.id.clone(),
                id: if p.exec_id.is_empty() {
                    c.id.clone()
                } else {
                    p.exec_id.clone()
                },
                pid: p.pid(),
                exit_status: exit.status,
                exited_at: timestamp(Some(exit)),
                ..Default::default()
            }))
            .await;
        if p.exec_id.is_empty() {
            c.set_status(ContainerStatus::Stopped);
        }
        p.mark_exited(exit);
    });
}

pub async fn start(inner: &Inner, req: api::StartRequest) -> Result<api::StartResponse> {
    let c = inner.container(&req.id)?;
    let p = c.process(&req.exec_id)?;
    // `Starting` from here until the agent answered: a concurrent Start is
    // refused.
    p.transition(Op::Start)?;
    let streams = Arc::new(AgentStreams {
        sandbox: c.sandbox.clone(),
        container_id: c.id.clone(),
        exec_id: p.exec_id.clone(),
    });
    let guest = c.sandbox.guest();
    if p.exec_id.is_empty() && c.id == c.sandbox.id() {
        // The sandbox's own container: its network comes first.
        if let Err(e) = c.sandbox.network_ready().await {
            if let Err(t) = p.transition(Op::StartFailed) {
                tracing::warn!(process = %p.what(), error = %t, "recording the failed start");
            }
            return Err(e);
        }
    }
    let started = if p.exec_id.is_empty() {
        p.start_io(streams.clone());
        fault::point("start.before-agent");
        let r = guest.start_container(&c.id).await;
        if r.is_ok() {
            fault::point("start.after-agent");
        }
        r
    } else {
        fault::point("exec.before-agent");
        let r = guest
            .exec_process(
                &c.id,
                &p.exec_id,
                p.spec.clone().unwrap_or_default(),
                p.stdio.has_stdin(),
            )
            .await;
        if r.is_ok() {
            fault::point("exec.after-agent");
            p.start_io(streams);
        }
        r
    };
    let pid = match started {
        Ok(pid) => pid,
        Err(e) => {
            if let Err(t) = p.transition(Op::StartFailed) {
                tracing::warn!(process = %p.what(), error = %t, "recording the failed start");
            }
            if p.exec_id.is_empty() {
                // The guest init may have died trying (exec failed): its
                // exit makes the task stopped, as containerd expects.
                spawn_waiter(c.clone(), p.clone(), inner.events.clone());
            }
            return Err(e);
        }
    };
    // Task pids are guest pids: CRI builds the pod's namespace paths
    // (`/proc/<sandbox pid>/ns/…`) from the sandbox task's pid, and the
    // agent joins them in the guest, where that pid is the pause process.
    tracing::info!(process = %p.what(), pid, "started");
    p.started(pid)?;
    let event = if p.exec_id.is_empty() {
        TaskEvent::Start(TaskStart {
            container_id: c.id.clone(),
            pid,
            ..Default::default()
        })
    } else {
        TaskEvent::ExecStarted(TaskExecStarted {
            container_id: c.id.clone(),
            exec_id: p.exec_id.clone(),
            pid,
            ..Default::default()
        })
    };
    inner.events.publish(event).await;
    if p.exec_id.is_empty() {
        c.set_status(ContainerStatus::Running);
    }
    spawn_waiter(c.clone(), p.clone(), inner.events.clone());
    Ok(api::StartResponse {
        pid,
        ..Default::default()
    })
}

pub async fn exec(inner: &Inner, req: api::ExecProcessRequest) -> Result<Empty> {
    let c = inner.container(&req.id)?;
    if req.exec_id.is_empty() {
        return Err(Error::invalid("exec id is empty"));
    }
    crate::state::check_id("exec id", &req.exec_id)?;
    if !c.init.status().is_live() || c.init.status() == Status::Created {
        return Err(Error::precondition(format!(
            "container {} is {}: exec needs a running container",
            c.id,
            c.init.status()
        )));
    }
    if c.exec(&req.exec_id).is_ok() {
        return Err(Error::exists(format!(
            "exec {} of container {} already exists",
            req.exec_id, c.id
        )));
    }
    let spec = req
        .spec
        .as_ref()
        .map(|a| a.value.clone())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Error::invalid(format!("exec {}: no process spec", req.exec_id)))?;
    let stdio = StdioConfig {
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
        terminal: req.terminal,
    };
    let host_io = HostIo::open(
        &stdio,
        &IoContext {
            container_id: c.id.clone(),
            namespace: inner.namespace.clone(),
        },
    )
    .await?;
    let p = Process::new(&c.id, &req.exec_id, stdio, Some(spec), host_io, 0);
    {
        let mut execs = c.execs.lock().unwrap_or_else(|p| p.into_inner());
        if execs.contains_key(&req.exec_id) {
            return Err(Error::exists(format!(
                "exec {} already exists",
                req.exec_id
            )));
        }
        execs.insert(req.exec_id.clone(), p);
    }
    inner
        .events
        .publish(TaskEvent::ExecAdded(TaskExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id,
            ..Default::default()
        }))
        .await;
    fault::point("exec.added");
    Ok(Empty::new())
}

pub async fn kill(inner: &Inner, req: api::KillRequest) -> Result<Empty> {
    let c = inner.container(&req.id)?;
    let p = c.process(&req.exec_id)?;
    let status = match p.check(Op::Kill) {
        Ok(s) => s,
        Err(e) => {
            if req.all && p.exec_id.is_empty() && e.kind() == Kind::NotFound {
                // `kill --all` after the init exited still kills what is left
                // in the container's cgroup, as runc does: without a pid
                // namespace of its own (hostPID) the init's children survive
                // it and hold its output open, and containerd waits for the
                // output to close before it deletes the task.
                if let Err(left) = c
                    .sandbox
                    .guest()
                    .signal_process(&c.id, "", req.signal, true)
                    .await
                {
                    tracing::debug!(process = %p.what(), error = %left, "signalling what is left of an exited container");
                }
            }
            return Err(e);
        }
    };
    if !p.exec_id.is_empty() && status == Status::Created {
        return Err(Error::precondition(format!("{}: not started", p.what())));
    }
    c.sandbox
        .guest()
        .signal_process(&c.id, &p.exec_id, req.signal, req.all)
        .await?;
    if p.exec_id.is_empty() && status == Status::Created {
        // A container killed before it started still exits.
        spawn_waiter(c.clone(), p.clone(), inner.events.clone());
    }
    Ok(Empty::new())
}

pub async fn wait(inner: &Inner, req: api::WaitRequest) -> Result<api::WaitResponse> {
    let c = inner.container(&req.id)?;
    let p = c.process(&req.exec_id)?;
    let e = p.wait().await;
    Ok(api::WaitResponse {
        exit_status: e.status,
        exited_at: timestamp(Some(e)),
        ..Default::default()
    })
}

fn delete_response(p: &Process) -> api::DeleteResponse {
    let e = p.exit_status();
    api::DeleteResponse {
        pid: p.pid(),
        exit_status: e.map(|e| e.status).unwrap_or(0),
        exited_at: timestamp(e),
        ..Default::default()
    }
}

pub async fn delete(inner: &Inner, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
    if !req.exec_id.is_empty() {
        let c = inner.container(&req.id)?;
        let p = c.exec(&req.exec_id)?;
        p.transition(Op::Delete)?;
        p.close_io().await;
        p.transition(Op::DeleteDone)?;
        c.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.exec_id);
        return Ok(delete_response(&p));
    }
    let lifecycle = inner.lifecycle.lock().await;
    let c = inner.container(&req.id)?;
    let p = c.init.clone();
    // A listed container whose sandbox is no longer running: StopSandbox
    // (Sandbox API) stopped the VM and removed the sandbox's host state,
    // this container's with it. Only the bookkeeping is left.
    let torn_down = lifecycle.is_none();
    if torn_down {
        // Its processes went with the VM.
        p.mark_exited(ExitStatus::now(128 + 9));
    }
    // `Deleting` from here on: only the exit may still be recorded.
    let before = p.transition(Op::Delete)?;
    fault::point("delete.before-remove");
    if !torn_down {
        if let Err(e) = c.sandbox.guest().remove_container(&c.id).await {
            tracing::warn!(container = %c.id, error = %e, "removing the container in the guest failed; cleaning up the host side anyway");
        }
    }
    fault::point("delete.after-remove");
    if before == Status::Created {
        p.mark_exited(ExitStatus::now(128 + 9));
    }
    for e in c.execs() {
        p_close(&e).await;
    }
    p.close_io().await;
    let mut trouble = Vec::new();
    if !torn_down {
        if let Err(e) = c.sandbox.detach_devices(&c.id).await {
            trouble.push(e.to_string());
        }
        fault::point("delete.devices-detached");
        if let Err(e) = c.sandbox.release_rootfs(&c.id, &c.bundle).await {
            trouble.push(e.to_string());
        }
        if let Err(e) = c.store.remove_container(&c.id) {
            trouble.push(e.to_string());
        }
    }
    if !trouble.is_empty() {
        tracing::error!(container = %c.id, trouble = %trouble.join("; "), "delete left host-side trouble (the sandbox cleanup handles it when the shim goes)");
    }
    p.transition(Op::DeleteDone)?;
    inner.containers().remove(&c.id);
    drop(lifecycle);
    let resp = delete_response(&p);
    inner
        .events
        .publish(TaskEvent::Delete(TaskDelete {
            container_id: c.id.clone(),
            pid: resp.pid,
            exit_status: resp.exit_status,
            exited_at: resp.exited_at.clone(),
            id: c.id.clone(),
            ..Default::default()
        }))
        .await;
    fault::point("delete.before-reply");
    Ok(resp)
}

async fn p_close(p: &Process) {
    if p.status().is_live() {
        p.mark_exited(ExitStatus::now(128 + 9));
    }
    p.close_io().await;
}

pub async fn pids(inner: &Inner, req: api::PidsRequest) -> Result<api::PidsResponse> {
    let c = inner.container(&req.id)?;
    let list = c.sandbox.guest().list_processes(&c.id).await?;
    let processes = list
        .into_iter()
        .map(|(pid, exec_id)| {
            let info = if exec_id.is_empty() {
                MessageField::none()
            } else {
                let d = ProcessDetails {
                    exec_id,
                    ..Default::default()
                };
                MessageField::some(Any {
                    type_url: "containerd.runc.v1.ProcessDetails".into(),
                    value: d.write_to_bytes().unwrap_or_default(),
                    ..Default::default()
                })
            };
            ProcessInfo {
                pid,
                info,
                ..Default::default()
            }
        })
        .collect();
    Ok(api::PidsResponse {
        processes,
        ..Default::default()
    })
}

pub async fn pause(inner: &Inner, req: api::PauseRequest) -> Result<Empty> {
    let c = inner.container(&req.id)?;
    c.init.transition(Op::Pause)?;
    if let Err(e) = c.sandbox.guest().pause(&c.id).await {
        let _ = c.init.transition(Op::PauseFailed);
        return Err(e);
    }
    c.init.transition(Op::PauseDone)?;
    c.set_status(ContainerStatus::Paused);
    inner
        .events
        .publish(TaskEvent::Paused(TaskPaused {
            container_id: c.id.clone(),
            ..Default::default()
        }))
        .await;
    Ok(Empty::new())
}

pub async fn resume(inner: &Inner, req: api::ResumeRequest) -> Result<Empty> {
    let c = inner.container(&req.id)?;
    c.init.transition(Op::Resume)?;
    if let Err(e) = c.sandbox.guest().resume(&c.id).await {
        let _ = c.init.transition(Op::ResumeFailed);
        return Err(e);
    }
    c.init.transition(Op::ResumeDone)?;
    c.set_status(ContainerStatus::Running);
    inner
        .events
        .publish(TaskEvent::Resumed(TaskResumed {
            container_id: c.id.clone(),
            ..Default::default()
        }))
        .await;
    Ok(Empty::new())
}

pub async fn resize_pty(inner: &Inner, req: api::ResizePtyRequest) -> Result<Empty> {
    let c = inner.container(&req.id)?;
    let p = c.process(&req.exec_id)?;
    if !p.stdio.terminal {
        return Err(Error::precondition(format!("{} has no terminal", p.what())));
    }
    c.sandbox
        .guest()
        .resize_pty(&c.id, &p.exec_id, req.height, req.width)
        .await?;
    Ok(Empty::new())
}

pub fn close_io(inner: &Inner, req: api::CloseIORequest) -> Result<Empty> {
    let c = inner.container(&req.id)?;
    let p = c.process(&req.exec_id)?;
    if req.stdin {
        if let Some(io) = p.io() {
            io.close_stdin();
        }
    }
    Ok(Empty::new())
}

pub async fn update(inner: &Inner, req: api::UpdateTaskRequest) -> Result<Empty> {
    let c = inner.container(&req.id)?;
    let resources = req
        .resources
        .as_ref()
        .map(|a| a.value.clone())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Error::invalid("update without resources"))?;
    serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources).map_err(|e| {
        Error::invalid(format!(
            "resources are not OCI LinuxResources JSON ({}): {e}",
            req.resources.type_url
        ))
    })?;
    c.sandbox.guest().update(&c.id, resources).await?;
    Ok(Empty::new())
}

pub async fn stats(inner: &Inner, req: api::StatsRequest) -> Result<api::StatsResponse> {
    let c = inner.container(&req.id)?;
    let s = c.sandbox.guest().stats(&c.id).await?;
    Ok(api::StatsResponse {
        stats: MessageField::some(super::stats::to_any(&s)?),
        ..Default::default()
    })
}

pub async fn connect(inner: &Inner, req: api::ConnectRequest) -> Result<api::ConnectResponse> {
    let task_pid = match inner.containers().get(&req.id) {
        Some(c) => c.init.pid(),
        None => 0,
    };
    Ok(api::ConnectResponse {
        shim_pid: std::process::id(),
        task_pid,
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    })
}

pub async fn shutdown(inner: &Inner, _req: api::ShutdownRequest) -> Result<Empty> {
    let mut lifecycle = inner.lifecycle.lock().await;
    if let Some(p) = inner.pod().as_ref() {
        tracing::info!(sandbox = %p.id, "shutdown ignored: the Sandbox API made this shim's sandbox, and ShutdownSandbox ends it");
        return Ok(Empty::new());
    }
    let live = inner.containers().len();
    if live > 0 {
        tracing::info!(containers = live, "shutdown ignored: containers remain");
        return Ok(Empty::new());
    }
    if let Some(active) = lifecycle.take() {
        active.oom_watch.abort();
        fault::point("shutdown.before-stop");
        if let Err(e) = active.sandbox.shutdown().await {
            tracing::error!(sandbox = %active.id, error = %e, "stopping the sandbox");
        }
        fault::point("shutdown.after-stop");
        let report =
            cleanup::teardown(&active.paths, &[], &RealProcesses, KillTiming::default()).await;
        if !report.is_clean() {
            tracing::error!(sandbox = %active.id, errors = ?report.errors, "sandbox cleanup left trouble");
        }
    }
    inner.exit.signal();
    Ok(Empty::new())
}
