//! Pods and containers: creation, status, listing, stop (with its grace
//! period), removal.
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use capsule_tests::cri::node::POD_SUBNET_PREFIX;
use capsule_tests::cri::proto::v1::*;
use capsule_tests::cri::spec;
use capsule_tests::cri::suite::{Ctx, STATE_TIMEOUT};
use capsule_tests::wait_for;

use super::util::*;

/// A container that exits 0 at once on SIGTERM.
pub const SLEEPER: &str = "trap 'exit 0' TERM; echo ready; sleep 3600 & wait";

fn capsule_containers(ctx: &Ctx, pod: &str) -> Result<Vec<String>> {
    let o = ctx.node.capsule(&["list", "--json"])?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "capsule list --json: {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })?;
    let row = v
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == pod))
        .with_context(|| format!("capsule list has no sandbox {pod}: {v}"))?;
    Ok(row["containers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

fn wait_qemu_count(ctx: &Ctx, n: usize, what: &str) -> Result<()> {
    let mut last = 0;
    wait_for(what, Duration::from_secs(30), || {
        last = ctx.node.qemu_processes().len();
        (last == n).then_some(())
    })
    .with_context(|| format!("{last} QEMU processes, expected {n}"))
}

pub fn pod_lifecycle(ctx: &mut Ctx) -> Result<()> {
    let node = ctx.node;
    let cri = &node.cri;
    let (a, acfg) = ctx.pod("a")?;
    let st = cri
        .pod_sandbox_status(&a)?
        .status
        .context("PodSandboxStatus: no status")?;
    ensure!(st.id == a, "status of {a} names {}", st.id);
    ensure!(
        st.state == PodSandboxState::SandboxReady as i32,
        "pod {a} is {:?}, not ready",
        PodSandboxState::try_from(st.state)
    );
    ensure!(
        st.metadata.as_ref().map(|m| m.name.as_str())
            == acfg.metadata.as_ref().map(|m| m.name.as_str()),
        "status metadata {:?}",
        st.metadata
    );
    let ip = st.network.map(|n| n.ip).unwrap_or_default();
    ensure!(
        ip.starts_with(POD_SUBNET_PREFIX),
        "pod IP {ip:?} is not from the CNI subnet"
    );
    let listed = cri.list_pod_sandbox(Some(PodSandboxFilter {
        id: a.clone(),
        ..Default::default()
    }))?;
    ensure!(
        listed.len() == 1 && listed[0].runtime_handler == ctx.handler(),
        "ListPodSandbox by id: {listed:?}"
    );
    let c1 = ctx.start(&a, &spec::shell("c1", SLEEPER), &acfg)?;
    let c2 = ctx.start(&a, &spec::shell("c2", SLEEPER), &acfg)?;
    if ctx.is_capsule() {
        wait_qemu_count(ctx, 1, "one VM for the pod")?;
        let inside = capsule_containers(ctx, &a)?;
        for c in [&c1, &c2] {
            ensure!(
                inside.contains(c),
                "container {c} is not in pod {a}'s VM (capsule list: {inside:?})"
            );
        }
    }
    let (b, _) = ctx.pod("b")?;
    if ctx.is_capsule() {
        wait_qemu_count(ctx, 2, "one VM per pod")?;
    }
    let ready = cri.list_pod_sandbox(Some(PodSandboxFilter {
        state: Some(PodSandboxStateValue {
            state: PodSandboxState::SandboxReady as i32,
        }),
        ..Default::default()
    }))?;
    for p in [&a, &b] {
        ensure!(
            ready.iter().any(|x| &x.id == p),
            "ListPodSandbox(ready) lacks {p}: {ready:?}"
        );
    }
    cri.stop_pod_sandbox(&a)?;
    let st = cri.pod_sandbox_status(&a)?.status.context("no status")?;
    ensure!(
        st.state == PodSandboxState::SandboxNotready as i32,
        "stopped pod {a} is {:?}",
        PodSandboxState::try_from(st.state)
    );
    for c in [&c1, &c2] {
        let s = ctx.status(c)?;
        ensure!(
            s.state == ContainerState::ContainerExited as i32,
            "container {c} of the stopped pod is {:?}",
            ContainerState::try_from(s.state)
        );
    }
    if ctx.is_capsule() {
        wait_qemu_count(ctx, 1, "the stopped pod's VM to go away")?;
    }
    ctx.remove_pod(&a)?;
    ensure!(
        !cri.list_pod_sandbox(None)?.iter().any(|p| p.id == a),
        "removed pod {a} is still listed"
    );
    match cri.pod_sandbox_status(&a) {
        Err(e) if e.code == Some(tonic::Code::NotFound) => {}
        other => bail!("PodSandboxStatus of removed pod {a}: {other:?}"),
    }
    ctx.remove_pod(&b)?;
    Ok(())
}

pub fn container_lifecycle(ctx: &mut Ctx) -> Result<()> {
    let node = ctx.node;
    let cri = &node.cri;
    let (pod, pcfg) = ctx.pod("p")?;
    let ccfg = spec::shell("main", SLEEPER);
    let id = ctx.try_create(&pod, &ccfg, &pcfg)?;
    let s = ctx.status(&id)?;
    ensure!(
        s.state == ContainerState::ContainerCreated as i32 && s.created_at > 0,
        "new container: {s:?}"
    );
    let by_pod = |state: ContainerState| {
        cri.list_containers(Some(ContainerFilter {
            pod_sandbox_id: pod.clone(),
            state: Some(ContainerStateValue {
                state: state as i32,
            }),
            ..Default::default()
        }))
    };
    ensure!(
        by_pod(ContainerState::ContainerCreated)?
            .iter()
            .any(|c| c.id == id),
        "ListContainers(created) lacks {id}"
    );
    cri.start_container(&id)?;
    let s = ctx.status(&id)?;
    ensure!(
        s.state == ContainerState::ContainerRunning as i32 && s.started_at > 0,
        "started container: {s:?}"
    );
    ensure!(
        by_pod(ContainerState::ContainerRunning)?
            .iter()
            .any(|c| c.id == id),
        "ListContainers(running) lacks {id}"
    );
    wait_log(&pcfg, &ccfg, "ready")?;
    cri.stop_container(&id, 10)?;
    let s = ctx.status(&id)?;
    ensure!(
        s.state == ContainerState::ContainerExited as i32
            && s.exit_code == 0
            && s.finished_at >= s.started_at,
        "stopped container: state {:?} exit {} reason {:?}; started_at {} finished_at {} ({:+.3} s)",
        ContainerState::try_from(s.state),
        s.exit_code,
        s.reason,
        s.started_at,
        s.finished_at,
        (s.finished_at - s.started_at) as f64 / 1e9
    );
    cri.remove_container(&id)?;
    match cri.container_status(&id) {
        Err(e) if e.code == Some(tonic::Code::NotFound) => {}
        other => bail!("ContainerStatus of removed container {id}: {other:?}"),
    }
    ensure!(
        !cri.list_containers(None)?.iter().any(|c| c.id == id),
        "removed container {id} is still listed"
    );
    // A container that exits by itself, non-zero.
    let quitter = ctx.start(&pod, &spec::shell("quitter", "exit 7"), &pcfg)?;
    let s = ctx.wait_exited(&quitter, STATE_TIMEOUT)?;
    ensure!(
        s.exit_code == 7 && s.reason == "Error",
        "`exit 7`: exit code {} reason {:?}",
        s.exit_code,
        s.reason
    );
    Ok(())
}

/// StopContainer's grace period: a container handling SIGTERM exits at
/// once, with its own status.
pub fn stop_sigterm(ctx: &mut Ctx) -> Result<()> {
    let (pod, pcfg) = ctx.pod("p")?;
    let ccfg = spec::shell(
        "main",
        "trap 'echo got-term; exit 0' TERM; echo ready; sleep 3600 & wait",
    );
    let id = ctx.start(&pod, &ccfg, &pcfg)?;
    wait_log(&pcfg, &ccfg, "ready")?;
    let t = Instant::now();
    ctx.node.cri.stop_container(&id, 30)?;
    let took = t.elapsed();
    let s = ctx.status(&id)?;
    let log = std::fs::read_to_string(log_path(&pcfg, &ccfg)).unwrap_or_default();
    ensure!(
        s.exit_code == 0 && log.contains("got-term") && took < Duration::from_secs(10),
        "StopContainer (grace 30 s) took {:.1} s; exit code {} (137 = SIGKILL), SIGTERM {}",
        took.as_secs_f64(),
        s.exit_code,
        if log.contains("got-term") {
            "handled"
        } else {
            "never reached the container"
        }
    );
    ctx.note(format!("stopped in {:.1} s", took.as_secs_f64()));
    Ok(())
}

/// A container ignoring SIGTERM is killed when the grace period ends.
pub fn stop_timeout_sigkill(ctx: &mut Ctx) -> Result<()> {
    let (pod, pcfg) = ctx.pod("p")?;
    let ccfg = spec::shell(
        "main",
        "trap '' TERM; echo ready; while :; do sleep 1; done",
    );
    let id = ctx.start(&pod, &ccfg, &pcfg)?;
    wait_log(&pcfg, &ccfg, "ready")?;
    let t = Instant::now();
    ctx.node.cri.stop_container(&id, 5)?;
    let took = t.elapsed();
    let s = ctx.status(&id)?;
    ensure!(
        s.state == ContainerState::ContainerExited as i32 && s.exit_code == 137,
        "after StopContainer: state {:?}, exit code {} (expected 137, SIGKILL)",
        ContainerState::try_from(s.state),
        s.exit_code
    );
    ensure!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(25),
        "StopContainer with a 5 s grace period took {:.1} s",
        took.as_secs_f64()
    );
    ctx.note(format!("killed after {:.1} s", took.as_secs_f64()));
    Ok(())
}
